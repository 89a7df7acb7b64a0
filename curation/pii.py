"""PII redaction: personal data in every text field becomes a typed placeholder (``<EMAIL>``, ``<PERSON>``...).

Rule-based types are found by a pattern and then *validated*, the way Microsoft Presidio's recognizers do it
(https://microsoft.github.io/presidio/supported_entities/): a pattern alone over-flags (any 16 digits look like a
card), a checksum does not. Cards pass Luhn (ISO/IEC 7812-1), IBANs pass ISO 13616 mod-97 (ISO 7064 MOD 97-10),
IP addresses parse with :mod:`ipaddress`, phone numbers come from libphonenumber's matcher.

Order matters. Detectors run one after another over a working copy of the text in which every span already claimed
is masked (same length, so offsets hold): a later detector can never see, and half-eat, an earlier one's match. URL
credentials go before e-mails (``user:pw@host`` looks like an address), IBANs before cards (an IBAN's digit tail may
pass Luhn), cards and IPs before phones (libphonenumber happily reads ``1111 1111`` out of a card number). Types left
out of ``types`` are still detected, so they keep protecting the others, but are left in the text.

Names (PERSON, LOCATION, ORGANIZATION) come from spaCy: a trained NER pipeline when ``ner_model`` is set, otherwise
rule patterns for the ways people give their names in support chats. Placeholders already in the text are claimed
first, so redacting twice changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.records import Record, map_texts
from curation.steps import CurationError, InputError, Mapper, register

RULE_TYPES = ("URL_CREDENTIALS", "EMAIL", "IBAN", "CREDIT_CARD", "IP_ADDRESS", "PHONE")  # detection order
ENTITY_TYPES = ("PERSON", "LOCATION", "ORGANIZATION")
DEFAULT_NER_LABELS = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION",
                      "ORG": "ORGANIZATION"}

Span = tuple[int, int, "str | None"]  # (start, end, type); type None = a placeholder already there

PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z_]*>")
_MASK = "\ufffc"  # a claimed character as later detectors see it: no digit, letter, space, '@' or ':'
_DIGIT_RE = re.compile(r"\d")

_URL_CREDENTIALS_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>[^\s/?#@:<>\ufffc]+:[^\s/?#<>\ufffc]*)@")
_EMAIL_RE = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
# Upper case only, in groups of four or run together: lower-case letters would let the next word join the candidate.
_IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# A whole run of 13-19 digits with single spaces/dashes; never a slice of a longer number.
_CARD_RE = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
# At least two colons, so a time like 10:30 is never a candidate; ipaddress rejects 10:30:45 and MAC addresses.
_IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")

# Phone shape guards (see _phones).
_ITU_PREFIX_RE = re.compile(r"(?<![\w+])00(?=[1-9])")
_DATE_RE = re.compile(r"\d{1,4}([-./])\d{1,2}\1\d{1,4}")
_PRICE_RE = re.compile(r"\d+[.,]\d{2}")
_PHONE_FORMAT_RE = re.compile(r"^\+|\d[\s().\-/]+\d|^\(")
_GLUED_BEFORE_RE = re.compile(r"\d[ .\-]?$")
_GLUED_AFTER_RE = re.compile(r"^[ .\-]?\d")


def luhn_ok(digits: str) -> bool:
    """The Luhn check digit test (ISO/IEC 7812-1) on a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, and the number mod 97 must be 1."""
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _url_credentials(text: str) -> Iterator[tuple[int, int]]:
    for m in _URL_CREDENTIALS_RE.finditer(text):
        yield m.span("userinfo")  # scheme and host stay: they say what kind of link it was


def _emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" in text:
        for m in _EMAIL_RE.finditer(text):
            yield m.span()


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN_RE.finditer(text):
        if iban_ok(m.group().replace(" ", "")):
            yield m.span()


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD_RE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        # 0000 0000 0000 0000 passes Luhn; no issuer hands out a number of one repeated digit.
        if luhn_ok(digits) and len(set(digits)) > 1:
            yield m.span()


def _ipv6(text: str) -> Iterator[tuple[int, int]]:
    """IPv6 first, so the IPv4 tail of ::ffff:192.0.2.1 is not taken on its own."""
    if text.count(":") >= 2:
        for m in _IPV6_RE.finditer(text):
            # a bare "::" in prose is punctuation; ipaddress rejects 10:30:45 and 00:1A:2B:3C:4D:5E
            if re.search(r"[0-9A-Fa-f]", m.group()) and _parses(ipaddress.IPv6Address, m.group()):
                yield m.span()


def _ipv4(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4_RE.finditer(text):
        if _parses(ipaddress.IPv4Address, m.group()):  # 999.1.1.1 is not an address
            yield m.span()


def _parses(parse: Any, candidate: str) -> bool:
    try:
        parse(candidate)
    except ValueError:
        return False
    return True


def _phones(text: str, region: str) -> Iterator[tuple[int, int]]:
    """Phone numbers, found by libphonenumber's matcher at ``Leniency.POSSIBLE`` plus our own shape guards.

    Why not the default ``VALID``: fake numbers that fill support logs and test data (555-123-4567, (555) 010-0000,
    UK drama numbers +44 7700 900123) are not *valid* numbers, yet they are exactly what a real number looks like to
    a model and must go. ``POSSIBLE`` only checks the length, so it would also take dates, prices and order numbers;
    the guards in :func:`_phone_shaped` drop those. "00" as the international prefix (ITU-T E.164, used outside
    North America) is read as "+" whatever the region, so 0049 30 901820 is caught with region US too.
    """
    if not _DIGIT_RE.search(text):
        return
    import phonenumbers  # lazy: only texts with digits pay for it

    scan = _ITU_PREFIX_RE.sub(" +", text)  # same length, so offsets still point into text
    for m in phonenumbers.PhoneNumberMatcher(scan, region, leniency=phonenumbers.Leniency.POSSIBLE):
        start = m.start - 1 if text[m.start] == "0" and scan[m.start] == "+" else m.start
        if _phone_shaped(text, start, m.end, m.raw_string, m.number, region):
            yield start, m.end


def _phone_shaped(text: str, start: int, end: int, raw: str, number: Any, region: str) -> bool:
    import phonenumbers

    if len(_DIGIT_RE.findall(raw)) < 7:  # shortest subscriber numbers in use; drops 4500, 100234, 12.5.23
        return False
    if _DATE_RE.fullmatch(raw) or _PRICE_RE.fullmatch(raw) or text[start - 1:start] in ("$", "€", "£", "¥"):
        return False
    if _GLUED_BEFORE_RE.search(text[max(0, start - 2):start]) or _GLUED_AFTER_RE.search(text[end:end + 2]):
        return False  # a slice of a longer number (an order number, a Luhn-failing card)
    if _PHONE_FORMAT_RE.search(raw):  # "+", a group separator or "(": written as a phone number
        return True
    # A bare digit run is more often an order or ticket number than a phone. It counts only when dialled in full,
    # with the trunk prefix (0 in most countries, 1 in North America), and is a valid number.
    trunk = phonenumbers.ndd_prefix_for_region(region, True)
    return bool(trunk) and raw.startswith(trunk) and phonenumbers.is_valid_number(number)


# Support-chat cues that introduce a name. Only the name tokens after the cue are labelled (an EntityRuler would
# label the whole match), so cues are Matcher patterns grouped by their length and the cue is cut off each match.
# Support queues get chats in several languages, and a dropped non-English chat still lands in rejects.jsonl, so the
# cues cover the commonest European forms too (Spanish, German, French, Italian, Dutch, Portuguese).
_HONORIFICS = ["mr", "mrs", "ms", "mx", "miss", "dr", "prof", "sr", "sra", "srta", "herr", "frau", "mme", "mlle",
               "sig", "signor", "signora", "dhr", "mevr"]
_SIGN_OFFS = ["thanks", "regards", "cheers", "best", "sincerely", "gracias", "danke", "merci", "grazie", "obrigado",
              "obrigada", "bedankt"]
_CUES = [
    [{"LOWER": "my"}, {"LOWER": "name"}, {"LOWER": "is"}],
    [{"LOWER": "this"}, {"LOWER": "is"}],
    [{"LOWER": "i"}, {"LOWER": {"IN": ["'m", "’m", "am"]}}],
    [{"LOWER": "me"}, {"LOWER": "llamo"}],  # es
    [{"LOWER": {"IN": ["mi", "mein", "mijn"]}}, {"LOWER": {"IN": ["nombre", "name", "nome", "naam"]}},
     {"LOWER": {"IN": ["es", "ist", "è", "is"]}}],  # es, de, it, nl
    [{"LOWER": "ich"}, {"LOWER": {"IN": ["heiße", "heisse", "bin"]}}],  # de
    [{"LOWER": "hier"}, {"LOWER": "ist"}],  # de: "hier ist Jonas Becker"
    [{"LOWER": "je"}, {"LOWER": {"IN": ["m'appelle", "m’appelle"]}}],  # fr
    [{"LOWER": "je"}, {"LOWER": {"IN": ["m", "m'"]}}, {"LOWER": {"IN": ["'appelle", "’appelle", "appelle"]}}],
    [{"LOWER": "mi"}, {"LOWER": "chiamo"}],  # it
    [{"LOWER": "meu"}, {"LOWER": "nome"}, {"LOWER": "é"}],  # pt
    [{"ORTH": "M."}],  # fr "M. Laurent"
    [{"LOWER": {"IN": _HONORIFICS + [h + "." for h in _HONORIFICS]}}],
    [{"LOWER": {"IN": _HONORIFICS}}, {"ORTH": "."}],
    [{"LOWER": "dear"}],
    [{"LOWER": {"IN": _SIGN_OFFS}}, {"ORTH": ","}],
    [{"LOWER": {"IN": _SIGN_OFFS}}, {"ORTH": ","}, {"IS_SPACE": True}],  # "Thanks,\nTom"
    [{"LOWER": "thank"}, {"LOWER": "you"}, {"ORTH": ","}],
]
# A name word: capitalised, not a stop word ("This is It", "Thanks, I..."), letters with optional apostrophes (O'Brien).
_NAME = {"IS_TITLE": True, "IS_STOP": False, "TEXT": {"REGEX": r"^[^\W\d_]+(?:['’][^\W\d_]+)*$"}}
_NAME_PART = [_NAME, {**_NAME, "OP": "?"}, {**_NAME, "OP": "?"}]  # one to three words


def _cue_matcher(nlp: Any) -> Any:
    from spacy.matcher import Matcher

    matcher = Matcher(nlp.vocab)
    for cue in _CUES:
        matcher.add(f"cue{len(cue)}", [cue + _NAME_PART], greedy="LONGEST")
    return matcher


def _read_lines(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CurationError(f"names: cannot read {path}: {e.strerror}") from None
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _read_patterns(path: Path) -> list[tuple[str, Any]]:
    """``(where, pattern)`` for every line of an EntityRuler JSONL file, ``where`` naming file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CurationError(f"patterns: cannot read {path}: {e.strerror}") from None
    out = []
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(path, line_no, f"malformed JSON ({e.msg} at column {e.colno})") from None
    return out


@register("redact_pii")
@dataclass
class RedactPII(Mapper):
    """Replace PII in every text field with ``<TYPE>`` placeholders; counts land under ``pii:TYPE``. Never drops."""

    types: list[str] = field(default_factory=lambda: list(RULE_TYPES))  # rule-based types to redact
    region: str = "US"  # region assumed for phone numbers written without a country code
    entity_types: list[str] = field(default_factory=lambda: list(ENTITY_TYPES))  # names to redact ([] = no spaCy)
    ner_model: str | None = None  # spaCy package or pipeline folder (relative to the recipe); None = rule patterns
    language: str = "en"  # language of the blank spaCy pipeline for the rule patterns (ner_model unset)
    ner_labels: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NER_LABELS))  # spaCy label -> our type
    patterns: list[dict] | str | None = None  # extra EntityRuler patterns, or a JSONL file of them
    names: list[str] | str | None = None  # person-name gazetteer, or a file with one name per line

    def __post_init__(self) -> None:
        import phonenumbers

        _check_subset("types", self.types, RULE_TYPES)
        _check_subset("entity_types", self.entity_types, ENTITY_TYPES)
        if self.region not in phonenumbers.SUPPORTED_REGIONS:
            raise CurationError(f"redact_pii: region {self.region!r} is not a region code like 'US', 'GB' or 'DE'")
        if not isinstance(self.ner_labels, dict) or any(v not in ENTITY_TYPES for v in self.ner_labels.values()):
            raise CurationError(f"redact_pii: ner_labels {self.ner_labels!r} must map spaCy labels to one of "
                                f"{', '.join(ENTITY_TYPES)}")
        for name, value, item in (("patterns", self.patterns, dict), ("names", self.names, str)):
            if not (value is None or isinstance(value, str)
                    or isinstance(value, list) and all(isinstance(v, item) for v in value)):
                raise CurationError(f"redact_pii: {name} must be a file path or a list of {item.__name__}s, "
                                    f"got {value!r}")

    def apply(self, record: Record) -> Record:
        return map_texts(record, self.redact)

    def redact(self, text: str) -> str:
        spans: list[Span] = [(m.start(), m.end(), None) for m in PLACEHOLDER_RE.finditer(text)]
        scan = _mask(text, spans)
        for kind, find in (("URL_CREDENTIALS", _url_credentials), ("EMAIL", _emails), ("IBAN", _ibans),
                           ("CREDIT_CARD", _cards), ("IP_ADDRESS", _ipv6), ("IP_ADDRESS", _ipv4),
                           ("PHONE", self._phones)):
            found = [(start, end, kind) for start, end in find(scan)]
            spans += found
            scan = _mask(scan, found)
        if self.entity_types:
            # NER reads the original text (masks would spoil its context); what overlaps a rule match is dropped.
            spans += [s for s in self._entities(text) if not any(s[0] < e and b < s[1] for b, e, _ in spans)]
        return self._replace(text, spans)

    def _phones(self, text: str) -> Iterator[tuple[int, int]]:
        return _phones(text, self.region)

    def _replace(self, text: str, spans: list[Span]) -> str:
        out, pos = [], 0
        for start, end, kind in sorted(spans, key=lambda s: s[0]):
            if kind is None or kind in RULE_TYPES and kind not in self.types:
                continue
            out += [text[pos:start], f"<{kind}>"]
            pos = end
            self.counters[f"pii:{kind}"] += 1
        out.append(text[pos:])
        return "".join(out)

    def _entities(self, text: str) -> list[Span]:
        from spacy.tokens import Span as SpacySpan
        from spacy.util import filter_spans

        nlp, cues = self._pipeline()
        doc = nlp(text)
        found = [ent for ent in doc.ents if self._entity_type(ent.label_) in self.entity_types]
        if cues is not None and "PERSON" in self.entity_types:
            for match_id, start, end in cues(doc):
                cue_len = int(nlp.vocab.strings[match_id][3:])
                found.append(SpacySpan(doc, start + cue_len, end, label="PERSON"))
        return [(s.start_char, s.end_char, self._entity_type(s.label_)) for s in filter_spans(found)]

    def _entity_type(self, label: str) -> str | None:
        return label if label in ENTITY_TYPES else self.ner_labels.get(label)

    def _pipeline(self) -> tuple[Any, Any]:
        """The spaCy pipeline and the cue matcher (None with a trained model), built once per process."""
        if getattr(self, "_nlp", None) is None:
            import spacy

            if self.ner_model:
                nlp, cues = self._load_model(), None
            else:
                try:
                    nlp = spacy.blank(self.language)
                except ImportError:
                    raise CurationError(f"redact_pii: language {self.language!r} is not a spaCy language code") from None
                cues = _cue_matcher(nlp)
            user = self._user_patterns()
            if user:
                ruler = nlp.add_pipe("entity_ruler", before="ner" if "ner" in nlp.pipe_names else None)
                ruler.add_patterns(user)  # before "ner": the model keeps entities a gazetteer already set
            self._nlp, self._cues = nlp, cues
        return self._nlp, self._cues

    def _load_model(self) -> Any:
        import spacy

        local = self._path(self.ner_model)
        try:
            nlp = spacy.load(local if local.exists() else self.ner_model)
        except (OSError, ValueError) as e:
            raise CurationError(f"redact_pii: ner_model {self.ner_model!r} cannot be loaded: {e}") from None
        # Only the entities are needed: tagger, parser and lemmatizer would multiply the cost for nothing.
        keep = {"ner", "entity_ruler", "span_ruler", "tok2vec", "transformer"}
        nlp.select_pipes(disable=[p for p in nlp.pipe_names if p not in keep])
        return nlp

    def _user_patterns(self) -> list[dict]:
        if isinstance(self.patterns, str):
            items = _read_patterns(self._path(self.patterns))
        else:
            items = [(f"patterns[{i}]", p) for i, p in enumerate(self.patterns or [])]
        names = _read_lines(self._path(self.names)) if isinstance(self.names, str) else self.names or []
        items += [(f"names[{i}]", {"label": "PERSON", "pattern": n}) for i, n in enumerate(names)]
        for where, p in items:
            if not isinstance(p, dict) or "pattern" not in p or self._entity_type(p.get("label", "")) is None:
                raise CurationError(f"redact_pii: {where}: expected {{'label': ..., 'pattern': ...}} with a label "
                                    f"of {', '.join(ENTITY_TYPES)} or one in ner_labels, got {p!r}")
        return [p for _, p in items]

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path


def _check_subset(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, list) or any(v not in allowed for v in value):
        raise CurationError(f"redact_pii: {name} {value!r} must be a list drawn from {', '.join(allowed)}")


def _mask(text: str, spans: list[Span]) -> str:
    """``text`` with each (non-overlapping) span overwritten by mask characters, in one pass."""
    if not spans:
        return text
    out, pos = [], 0
    for start, end, _ in sorted(spans, key=lambda s: s[0]):
        out += [text[pos:start], _MASK * (end - start)]
        pos = end
    out.append(text[pos:])
    return "".join(out)
