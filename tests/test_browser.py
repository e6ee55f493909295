"""The demo chat page in a real headless browser (Debian's ``chromium``).

Two users chat through the page served at ``/`` (development mode: guest
identities), one of them sees the other typing, then goes away and comes
back: the page resumes from its last position and shows every message it
missed, once and in order. Skipped with a reason when no browser is
installed, except under CI (``CI`` set), where a missing browser fails.
"""

from __future__ import annotations

import json
import os

import pytest
from _browser import Page, chromium_path, open_browser
from _sockets import running_server

BROWSER = chromium_path()

pytestmark = pytest.mark.skipif(
    BROWSER is None and not os.environ.get("CI"),
    reason="no chromium installed (apt-get install chromium); CI installs it and runs this test",
)


async def texts(page: Page) -> list[str]:
    value = await page.evaluate("JSON.stringify([...document.querySelectorAll('#messages li .text')].map((e) => e.textContent))")
    return list(json.loads(value))


async def say(page: Page, text: str) -> None:
    await page.evaluate(
        f"document.getElementById('message-input').value = {json.dumps(text)};document.getElementById('send-form').requestSubmit(); true"
    )


async def test_two_users_chat_and_one_reconnects_without_losing_messages() -> None:
    assert BROWSER is not None, "CI must install chromium (.ci/run does)"
    async with running_server() as server, open_browser(BROWSER) as browser:
        url = f"http://127.0.0.1:{server.port}/?room=general"
        alice = await browser.new_page(url)
        bob = await browser.new_page(url)
        for page in (alice, bob):
            await page.wait_for("window.ensembleClient && window.ensembleClient.state === 'open' && document.querySelector('#members li')")
        alice_id = await alice.evaluate("window.ensembleClient.welcome.user_id")
        bob_id = await bob.evaluate("window.ensembleClient.welcome.user_id")
        assert alice_id != bob_id
        assert await alice.evaluate("document.getElementById('status').dataset.state") == "open"

        # Chatting, both ways.
        await say(alice, "hello from alice")
        await bob.wait_for("[...document.querySelectorAll('#messages li .text')].some((e) => e.textContent === 'hello from alice')")
        await say(bob, "hi alice")
        await alice.wait_for("[...document.querySelectorAll('#messages li .text')].some((e) => e.textContent === 'hi alice')")
        # Presence: each sees the other online in the member list.
        await alice.wait_for(f"document.querySelector('#members li[data-user={json.dumps(bob_id)}] .dot.online')")

        # Typing indicator.
        await alice.evaluate("document.getElementById('message-input').dispatchEvent(new Event('input')); true")
        typing = await bob.wait_for("document.getElementById('typing').textContent")
        assert alice_id in typing

        # Bob goes away; alice sends three messages; bob comes back and resumes.
        await bob.evaluate("window.ensembleClient.close(); true")
        await bob.wait_for("window.ensembleClient.state === 'closed'")
        for n in range(3):
            await say(alice, f"while you were away {n}")
        await alice.wait_for(
            "[...document.querySelectorAll('#messages li .text')].filter((e) => e.textContent.startsWith('while')).length === 3"
        )
        await bob.evaluate("window.ensembleClient.connect().then(() => true)")
        await bob.wait_for(
            "[...document.querySelectorAll('#messages li .text')].filter((e) => e.textContent.startsWith('while')).length === 3"
        )
        seen = await texts(bob)
        assert seen.count("hello from alice") == 1
        missed = [text for text in seen if text.startswith("while")]
        assert missed == [f"while you were away {n}" for n in range(3)]  # each once, in order
        seqs = json.loads(await bob.evaluate("JSON.stringify([...document.querySelectorAll('#messages li')].map((e) => +e.dataset.seq))"))
        assert seqs == sorted(seqs)
