"""Drive Argilla's real web UI with headless Chromium: launch the browser, sign in, rank, submit.

The browser is the distribution's Chromium (Debian's ``chromium`` package at /usr/bin/chromium, or $RLHF_CHROMIUM)
driven by Playwright through ``executable_path``: Playwright's own browser download needs a CDN that CI machines and
air-gapped hosts cannot reach, and ``.ci/run`` installs the Debian package instead.

Selectors come from Argilla 2.8's frontend (argilla-frontend/pages/sign-in.vue and
components/features/annotation/container/questions/form/ranking/drag-and-drop-selection/DndSelection.component.vue):
the sign-in inputs are labelled "Username"/"Password"; each ranking card is a ``div`` whose ``title`` is the option's
text ("Response 3"), sitting in ``.draggable__questions-container`` until it is dropped into one of the
``.draggable__slot`` rows (slot i = rank i; several cards in one slot = a tie).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

# Chromium flags (headless comes from Playwright) for root in a container with no GPU and no route to the internet:
# --no-sandbox: Chromium's sandbox refuses to run as root; --disable-gpu: no GPU, no GL;
# the rest stop Chromium's own background traffic (component updates, sync, QUIC probes, first-run pings): offline,
# without them, the page's own connections were refused many at a time.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000  # one UI step (a page load, a drop, a submit); the whole walkthrough takes a few seconds
SKIP_ENV = "RLHF_SKIP_BROWSER"  # =1: skip the browser test explicitly (a missing browser otherwise fails it)


def find_chromium() -> str | None:
    """Path of the Chromium binary: $RLHF_CHROMIUM when set (no fallback: a wrong setting must show), else Debian's
    /usr/bin/chromium, else ``chromium`` on PATH; None when there is none."""
    explicit = os.environ.get("RLHF_CHROMIUM")
    candidates = [explicit] if explicit else ["/usr/bin/chromium", shutil.which("chromium")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def launch(playwright, executable: str):
    """A headless Chromium (the given binary, not Playwright's download)."""
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)


def html_snippet(page, limit: int = 4000) -> str:
    """The page's markup without icons, styles and scripts, cut to ``limit`` characters: enough to see which
    selector no longer matches when Argilla's UI changes."""
    html = page.content()
    html = re.sub(r"<(svg|style|script)\b.*?</\1>", "", html, flags=re.DOTALL)
    html = re.sub(r' data-v-[0-9a-f]+=""', "", html)  # Vue's scoped-style attributes: noise
    body = html[html.find("<body"):] if "<body" in html else html
    return body[:limit]


class ArgillaUI:
    """Page object for Argilla 2.8's annotator screens, bound to one server and one browser page."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url.rstrip("/")
        page.set_default_timeout(TIMEOUT_MS)
        # Hermetic: only the Argilla server is reachable. The UI asks Google Fonts for its fonts; offline that
        # request would hang until DNS gives up, online the test would depend on the internet.
        page.context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(self.base_url)
                           else route.abort())

    # ---------------------------------------------------------------------------------------------- waiting
    def wait_visible(self, locator, what: str) -> None:
        """Wait until ``locator`` shows; on timeout fail with what was expected, the URL and the page's markup."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            locator.first.wait_for(state="visible")
        except PlaywrightTimeout:
            raise self._not_found(what) from None

    def wait_text_of(self, locator, text, what: str) -> None:
        """Wait until ``locator``'s text is ``text`` (a string or a compiled pattern); on timeout fail like
        ``wait_visible``."""
        from playwright.sync_api import expect

        try:
            expect(locator).to_have_text(text, timeout=TIMEOUT_MS)
        except AssertionError:  # Playwright's expect raises AssertionError on timeout
            raise self._not_found(f"{what} (wanted {text!r}, saw {locator.all_inner_texts()})") from None

    def click(self, locator, what: str) -> None:
        """Click ``locator`` once it shows and takes clicks; otherwise fail like ``wait_visible``."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.wait_visible(locator, what)
        try:
            locator.first.click()
        except PlaywrightTimeout:
            raise self._not_found(f"{what} (shown but not clickable: disabled or covered)") from None

    def _not_found(self, what: str) -> AssertionError:
        return AssertionError(f"{what}: not there after {TIMEOUT_MS} ms at {self.page.url}\n"
                              f"page markup (cut):\n{html_snippet(self.page)}")

    @contextlib.contextmanager
    def evidence_on_failure(self, folder: Path) -> Iterator[None]:
        """On any failure inside the block, save ``browser-failure.png`` and ``browser-failure.html`` to ``folder``
        and print their paths (pytest shows captured output with the failure)."""
        try:
            yield
        except BaseException:
            folder.mkdir(parents=True, exist_ok=True)
            png, html = folder / "browser-failure.png", folder / "browser-failure.html"
            with contextlib.suppress(Exception):  # the page may be gone; the original error matters more
                self.page.screenshot(path=str(png), full_page=True)
                html.write_text(self.page.content())
            print(f"browser evidence: {png} {html} (url {self.page.url})")
            raise

    # ---------------------------------------------------------------------------------------------- screens
    def sign_in(self, username: str, password: str) -> None:
        """Fill and send the sign-in form; return once the home page lists datasets."""
        page = self.page
        page.goto(self.base_url + "/")  # an anonymous visitor is redirected to /sign-in
        self.wait_visible(page.get_by_label("Username"), "sign-in form")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        self.click(page.get_by_role("button", name="Sign in"), "Sign in button")
        self.wait_visible(page.get_by_text("Your datasets"), f"home page after signing in as {username}")

    def open_dataset(self, name: str) -> None:
        """Click the dataset's card on the home page; return once the ranking question shows."""
        self.click(self.page.get_by_text(name, exact=True), f"card of dataset {name} on the home page")
        self.wait_visible(self.page.locator(".draggable__slot"), f"ranking widget of dataset {name}")

    def shown_field(self, title: str, among: Sequence[str]) -> str:
        """Text of the record field titled ``title`` ("Prompt", "Response 2"), once it is one of ``among``: after a
        submit the next record replaces the last one, and reading too early would see the old text."""
        page = self.page
        title_el = page.locator(".text_field_component__title-content").filter(has_text=re.compile(f"^{title}$"))
        content = page.locator(".text_field_component").filter(has=title_el).locator(".content-area")
        one_of = re.compile(r"^\s*(" + "|".join(map(re.escape, among)) + r")\s*$")
        self.wait_text_of(content, one_of, f"field {title!r}")
        return content.inner_text().strip()

    def rank(self, ranks: Mapping[str, int]) -> None:
        """Drag each option card (by its shown text, e.g. "Response 3") into the slot of its rank, as an annotator
        does with the mouse; equal ranks share a slot (a tie). Each drop is checked before the next one."""
        page = self.page
        unranked = page.locator(".draggable__questions-container")
        for text, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            card = unranked.locator(f'[title="{text}"]')
            slot = page.locator(".draggable__slot").nth(rank - 1)
            self.wait_visible(card, f"unranked card {text!r}")
            box = slot.locator(".draggable__slot-box")
            # drag_to presses, moves and releases the mouse; Chromium turns that into the HTML5 drag events that
            # SortableJS (vuedraggable) listens to. Drop into the box's bottom padding, not its centre: over a card
            # already there (a tie) SortableJS sees "hovering an item" and does not insert; over empty space it does.
            height = box.bounding_box()["height"]
            card.drag_to(box, target_position={"x": 12, "y": height - 3})
            self.wait_visible(slot.locator(f'[title="{text}"]'), f"card {text!r} dropped into rank slot {rank}")

    def wait_submitted(self, n: int) -> None:
        """Wait until the progress footer's "submitted" counter reads ``n``: the UI's own confirmation."""
        counter = (self.page.locator(".status-counter").filter(has_text="submitted")
                   .locator(".status-counter__counter"))
        self.wait_text_of(counter, str(n), "the submitted counter")

    def submit(self) -> int:
        """Click Submit; return the HTTP status of the response the UI sent to the server."""
        with self.page.expect_response(_is_response_write) as sent:
            self.click(self.page.get_by_role("button", name="Submit"), "Submit button")
        return sent.value.status


def _is_response_write(r) -> bool:
    """The UI saves an annotation with POST /api/v1/records/{id}/responses (first answer) or
    PUT /api/v1/responses/{id} (over a draft)."""
    path = urlparse(r.url).path
    return (r.request.method == "POST" and re.fullmatch(r"/api/v1/records/[^/]+/responses", path) is not None
            or r.request.method == "PUT" and re.fullmatch(r"/api/v1/responses/[^/]+", path) is not None)
