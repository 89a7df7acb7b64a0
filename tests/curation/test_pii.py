import pickle
import random

import pytest

from curation.pii import RedactPII, iban_ok, luhn_ok
from curation.steps import REGISTRY, CurationError, InputError


@pytest.fixture(scope="module")
def step():
    return RedactPII()


@pytest.fixture(scope="module")
def rules_only():
    return RedactPII(entity_types=[])


@pytest.mark.parametrize("text, expected", [
    ("write to maria.lopez+billing@example.co.uk today", "write to <EMAIL> today"),
    ("Mail: J_Doe@mail.example.com.", "Mail: <EMAIL>."),
    ("user@localhost is not an address", "user@localhost is not an address"),
    ("we met @ noon", "we met @ noon"),
])
def test_emails(rules_only, text, expected):
    assert rules_only.redact(text) == expected


@pytest.mark.parametrize("text, region", [
    ("call +44 20 7946 0958 now", "US"),
    ("call +1 (202) 555-0143 now", "US"),
    ("call 0049 30 901820 now", "US"),  # "00" international prefix, whatever the region
    ("call 020 7946 0958 now", "GB"),
    ("call (415) 555-2671 now", "US"),
    ("call 415.555.2671 now", "US"),
    ("call 555-123-4567 now", "US"),  # a fake number: not "valid", still redacted (Leniency.POSSIBLE)
    ("call 02079460958 now", "GB"),  # a bare run dialled in full, trunk prefix and all
    ("call 12025550143 now", "US"),
])
def test_phones(text, region):
    assert RedactPII(region=region, entity_types=[]).redact(text) == "call <PHONE> now"


@pytest.mark.parametrize("text", [
    "Order 1234567890 shipped on 2023-10-15 at 10:30.",
    "It costs $1,299.99 or 1299.99 EUR, ticket 4500, invoice 100234.",
    "dated 12/10/2023 and 12.5.2023",
    "ticket 2025550143 closed",  # a bare run without trunk prefix reads as an order/ticket number
])
@pytest.mark.parametrize("region", ["US", "GB"])
def test_phone_negatives(text, region):
    assert RedactPII(region=region, entity_types=[]).redact(text) == text


def test_checksums():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82WEST12345698765433")


@pytest.mark.parametrize("text, expected", [
    ("card 4111 1111 1111 1111 exp", "card <CREDIT_CARD> exp"),
    ("card 4111-1111-1111-1111 exp", "card <CREDIT_CARD> exp"),
    ("amex 378282246310005.", "amex <CREDIT_CARD>."),
    # Luhn fails: an order number, kept whole (not half-eaten as a phone either)
    ("order 1234 5678 9012 3456 ok", "order 1234 5678 9012 3456 ok"),
    ("order 4111111111111112 ok", "order 4111111111111112 ok"),
    ("zeros 0000 0000 0000 0000", "zeros 0000 0000 0000 0000"),
])
def test_credit_cards(rules_only, text, expected):
    assert rules_only.redact(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("pay GB82 WEST 1234 5698 7654 32 now", "pay <IBAN> now"),
    ("pay DE89370400440532013000.", "pay <IBAN>."),
    ("pay GB82 WEST 1234 5698 7654 33 now", "pay GB82 WEST 1234 5698 7654 33 now"),  # mod-97 fails
])
def test_ibans(rules_only, text, expected):
    assert rules_only.redact(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("ping 192.168.1.10.", "ping <IP_ADDRESS>."),
    ("v6 2001:db8::ff00:42:8329 and fe80::1 up", "v6 <IP_ADDRESS> and <IP_ADDRESS> up"),
    ("mapped ::ffff:192.0.2.1 and 1:2:3:4:5:6:7:8", "mapped <IP_ADDRESS> and <IP_ADDRESS>"),
    ("bad 999.1.1.1 and 256.0.0.1", "bad 999.1.1.1 and 256.0.0.1"),
    ("at 10:30 or 10:30:45, version 1.2.3", "at 10:30 or 10:30:45, version 1.2.3"),
    ("MAC 00:1A:2B:3C:4D:5E stays", "MAC 00:1A:2B:3C:4D:5E stays"),
])
def test_ip_addresses(rules_only, text, expected):
    assert rules_only.redact(text) == expected


def test_url_credentials_keep_scheme_and_host():
    rules_only = RedactPII(entity_types=[])
    text = "clone https://bob:s3cr3t@example.com/path or ftp://u:p@w@ftp.example.org, not ssh://example.com/x"
    assert rules_only.redact(text) == ("clone https://<URL_CREDENTIALS>@example.com/path or "
                                       "ftp://<URL_CREDENTIALS>@ftp.example.org, not ssh://example.com/x")
    assert dict(rules_only.counters) == {"pii:URL_CREDENTIALS": 2}  # user:pw@host is not also an e-mail


@pytest.mark.parametrize("text, expected", [
    ("Hi, my name is Maria Lopez and I need help.", "Hi, my name is <PERSON> and I need help."),
    ("Hello, this is John from billing.", "Hello, this is <PERSON> from billing."),
    ("I'm Priya Patel, account holder.", "I'm <PERSON>, account holder."),
    ("Please ask Mr. Smith or Mrs Jones.", "Please ask Mr. <PERSON> or Mrs <PERSON>."),
    ("Dear Anna Kowalski,\nyour router ships today.", "Dear <PERSON>,\nyour router ships today."),
    ("That fixed it.\nThanks,\nTom", "That fixed it.\nThanks,\n<PERSON>"),
    ("Thanks, Tom", "Thanks, <PERSON>"),
    # cues without a name after them stay as they are
    ("Thanks, I will try. This is It. I'm sorry, this is odd.", "Thanks, I will try. This is It. I'm sorry, this is odd."),
])
def test_support_chat_name_rules(step, text, expected):
    assert step.redact(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Hola, me llamo Lucía Fernández. Estoy de viaje.", "Hola, me llamo <PERSON>. Estoy de viaje."),
    ("Hola, Sra. Fernández, gracias por escribirnos.", "Hola, Sra. <PERSON>, gracias por escribirnos."),
    ("Guten Tag, hier ist Jonas Becker. Mein Internet ist langsam.", "Guten Tag, hier ist <PERSON>. Mein Internet ist langsam."),
    ("Guten Tag, Herr Becker.", "Guten Tag, Herr <PERSON>."),
    ("Ich heiße Anna Schmidt.", "Ich heiße <PERSON>."),
    ("Bonjour, je m'appelle Camille Laurent.", "Bonjour, je m'appelle <PERSON>."),
    ("Bonjour Mme Laurent, et M. Dupont aussi.", "Bonjour Mme <PERSON>, et M. <PERSON> aussi."),
    ("Mi chiamo Marco Rossi.", "Mi chiamo <PERSON>."),
])
def test_name_cues_in_other_european_languages(step, text, expected):
    """Non-English chats are dropped by the language filter, but they still land in rejects.jsonl."""
    assert step.redact(text) == expected


def test_user_patterns_and_names(tmp_path):
    (tmp_path / "names.txt").write_text("# staff\nZoltan Kovacs\n\n", encoding="utf-8")
    (tmp_path / "patterns.jsonl").write_text('{"label": "ORG", "pattern": "Acme Telecom"}\n'
                                             '{"label": "LOCATION", "pattern": [{"LOWER": "springfield"}]}\n',
                                             encoding="utf-8")
    from_files = RedactPII(patterns="patterns.jsonl", names="names.txt")
    from_files.base_dir = tmp_path
    inline = RedactPII(patterns=[{"label": "ORG", "pattern": "Acme Telecom"},
                                 {"label": "LOCATION", "pattern": [{"LOWER": "springfield"}]}],
                       names=["Zoltan Kovacs"])
    text = "zoltan kovacs? No: Zoltan Kovacs of Acme Telecom in SPRINGFIELD."
    expected = "zoltan kovacs? No: <PERSON> of <ORGANIZATION> in <LOCATION>."
    assert from_files.redact(text) == expected
    assert inline.redact(text) == expected


def test_bad_patterns_name_the_place(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"label": "ORG", "pattern": "Acme"}\n{oops\n', encoding="utf-8")
    bad_file = RedactPII(patterns="p.jsonl")
    bad_file.base_dir = tmp_path
    with pytest.raises(InputError, match=r"p\.jsonl:2: malformed JSON"):
        bad_file.redact("Acme")
    with pytest.raises(CurationError, match=r"patterns\[0\].*DATE"):
        RedactPII(patterns=[{"label": "DATE", "pattern": "today"}]).redact("today")


@pytest.mark.parametrize("options, field", [
    ({"types": ["EMAIL", "SSN"]}, "types"),
    ({"entity_types": ["PERSON", "DATE"]}, "entity_types"),
    ({"region": "XX"}, "region"),
    ({"ner_labels": {"PER": "HUMAN"}}, "ner_labels"),
    ({"names": [1, 2]}, "names"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(CurationError, match=field):
        RedactPII(**options)


def test_missing_model_is_a_clear_error(tmp_path):
    bad = RedactPII(ner_model="no_such_model")
    bad.base_dir = tmp_path
    with pytest.raises(CurationError, match="ner_model 'no_such_model' cannot be loaded"):
        bad.redact("Hello Maria")


def test_selected_types_only_and_no_spacy_without_entities():
    only_email = RedactPII(types=["EMAIL"], entity_types=[])
    text = "a@example.com, 4111 1111 1111 1111, my name is Maria Lopez"
    assert only_email.redact(text) == "<EMAIL>, 4111 1111 1111 1111, my name is Maria Lopez"
    assert getattr(only_email, "_nlp", None) is None  # spaCy is never loaded when no names are wanted
    # a card left in the text is still protected from the phone detector
    assert RedactPII(types=["PHONE"], entity_types=[]).redact("4111 1111 1111 1111") == "4111 1111 1111 1111"


CHAT = {
    "id": "r1",
    "messages": [
        {"role": "user", "content": "Hi, my name is Maria Lopez, card 4111 1111 1111 1111, mail maria@example.com."},
        {"role": "assistant", "content": "Thanks Maria. I'll call +1 (202) 555-0143 from 10.0.0.7."},
        {"role": "user", "content": "IBAN DE89 3704 0044 0532 0130 00, repo https://me:pw@git.example.com/x"},
    ],
    "meta": {"topic": "billing"},
}


def test_every_field_redacted_counts_and_idempotence():
    step = REGISTRY["redact_pii"]()
    [out] = list(step.run([CHAT]))
    assert [m["content"] for m in out["messages"]] == [
        "Hi, my name is <PERSON>, card <CREDIT_CARD>, mail <EMAIL>.",
        "Thanks Maria. I'll call <PHONE> from <IP_ADDRESS>.",
        "IBAN <IBAN>, repo https://<URL_CREDENTIALS>@git.example.com/x",
    ]
    assert out["meta"] == CHAT["meta"] and CHAT["messages"][0]["content"].startswith("Hi, my name is Maria")
    assert dict(step.counters) == {"pii:PERSON": 1, "pii:CREDIT_CARD": 1, "pii:EMAIL": 1, "pii:PHONE": 1,
                                   "pii:IP_ADDRESS": 1, "pii:IBAN": 1, "pii:URL_CREDENTIALS": 1}
    step.reset_stats()
    assert step.apply(out) == out  # running twice changes nothing
    assert not step.counters


def test_pickling_drops_the_pipeline(step):
    step.redact("my name is Maria Lopez")
    assert step._nlp is not None
    clone = pickle.loads(pickle.dumps(step))
    assert "_nlp" not in clone.__dict__
    assert clone.redact("my name is Maria Lopez") == "my name is <PERSON>"


# Tiny NER training set for the configured-model path: the assertions below use these very sentences.
NER_DATA = [
    ("Maria Lopez called about her bill.", [("Maria Lopez", "PERSON")]),
    ("John Smith lives in London.", [("John Smith", "PERSON"), ("London", "GPE")]),
    ("Priya Patel works at Acme Telecom.", [("Priya Patel", "PERSON"), ("Acme Telecom", "ORG")]),
    ("The router was shipped to Berlin.", [("Berlin", "GPE")]),
    ("Globex Corporation opened an office in Paris.", [("Globex Corporation", "ORG"), ("Paris", "GPE")]),
    ("Anna Kowalski asked for a refund.", [("Anna Kowalski", "PERSON")]),
    ("Tom Baker moved from Madrid to Rome.", [("Tom Baker", "PERSON"), ("Madrid", "GPE"), ("Rome", "GPE")]),
    ("Initech sent the invoice yesterday.", [("Initech", "ORG")]),
    ("Please reset the modem and wait.", []),
    ("The bill was higher this month.", []),
    ("Carlos Diaz works at Globex Corporation in Madrid.",
     [("Carlos Diaz", "PERSON"), ("Globex Corporation", "ORG"), ("Madrid", "GPE")]),
    ("Our technician visited Rome on Monday.", [("Rome", "GPE")]),
    ("Emma Brown complained to Initech.", [("Emma Brown", "PERSON"), ("Initech", "ORG")]),
    ("Signal is weak in London and Paris.", [("London", "GPE"), ("Paris", "GPE")]),
    ("Acme Telecom upgraded the network.", [("Acme Telecom", "ORG")]),
    ("Your order is on its way.", []),
    ("Liam Chen wants to cancel his plan.", [("Liam Chen", "PERSON")]),
    ("Sofia Rossi flew from Berlin to Madrid.", [("Sofia Rossi", "PERSON"), ("Berlin", "GPE"), ("Madrid", "GPE")]),
    ("We restarted the service overnight.", []),
    ("Umbrella Networks bought Initech.", [("Umbrella Networks", "ORG"), ("Initech", "ORG")]),
]


def _train_tiny_ner(path):
    import spacy
    from spacy.training import Example
    from spacy.util import fix_random_seed

    fix_random_seed(0)
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("ner")
    for label in ("PERSON", "GPE", "ORG"):
        ner.add_label(label)
    examples = []
    for text, spans in NER_DATA:
        ents = [(text.index(s), text.index(s) + len(s), label) for s, label in spans]
        examples.append(Example.from_dict(nlp.make_doc(text), {"entities": ents}))
    optimizer = nlp.initialize(lambda: examples)
    rng = random.Random(0)
    for _ in range(40):
        rng.shuffle(examples)
        nlp.update(examples, sgd=optimizer, drop=0.1)
    nlp.to_disk(path)


def test_configured_ner_model(tmp_path):
    _train_tiny_ner(tmp_path / "ner")
    step = RedactPII(ner_model=str(tmp_path / "ner"))
    assert step.redact("John Smith lives in London.") == "<PERSON> lives in <LOCATION>."
    assert step.redact("Priya Patel works at Acme Telecom.") == "<PERSON> works at <ORGANIZATION>."
    assert step.redact("Please reset the modem and wait.") == "Please reset the modem and wait."
    # rule types still go first; entity_types narrows what the model may redact
    assert step.redact("Maria Lopez called about her bill.") == "<PERSON> called about her bill."
    people_only = RedactPII(ner_model=str(tmp_path / "ner"), entity_types=["PERSON"])
    assert people_only.redact("Tom Baker moved from Madrid to Rome.") == "<PERSON> moved from Madrid to Rome."
    assert step.counters["pii:PERSON"] == 3 and step.counters["pii:LOCATION"] == 1
