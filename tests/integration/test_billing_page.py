"""The billing page in a real browser (Debian's Chromium driven by Playwright), on a real
worker (embedded broker, chdb) that requires a key for every read.

What a customer opening their link checks: the usage numbers on the page are the API's and
equal a reference computed here from the events sent; the rejected event is listed with its
reason; the event lookup answers; the link opens nothing of another customer, and an
expired or altered link opens nothing. The operator view works with an API key. The page
loads nothing from another origin and fits a phone's width. Screenshots are saved under
build/test-artifacts/.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from meterstream.api import links
from tests.harness import REPO, StackSlice, Worker, wait_until
from tests.integration.test_cli import cli
from tests.integration.test_events_api import keys_cli

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "build" / "test-artifacts"
DAY = 86_400_000
METERS = """
meters:
  - name: tokens
    event_name: ai_tokens
    aggregation: sum
    value: properties.tokens
    window: hour
  - name: calls
    event_name: ai_tokens
    aggregation: count
    window: day
"""
# Subscribd's model: a base fee and a price per unit (every customer, by the default plan).
PLANS = """
default_plan: subscribd
plans:
  - name: subscribd
    currency: usd
    base_fee: 20
    prices:
      - meter: tokens
        unit_price: 0.02
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: `make browser` installs it"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def month_days(now_ms: int) -> tuple[int, int]:
    """The first day of this UTC month and today (epoch ms of each day's start + 1 h)."""
    today = now_ms - now_ms % DAY
    first = time.gmtime(today / 1000)
    month_start = today - (first.tm_mday - 1) * DAY
    return month_start + 3_600_000, min(today + 3_600_000, now_ms - 1_000)


def api(worker: Worker, path: str, token: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return requests.get(f"{worker.web_url}{path}", headers=headers, timeout=60)


def test_a_customer_link_shows_the_apis_numbers_and_nothing_else(
    stack: StackSlice, browser: Any
) -> None:
    plans = stack.tmp / "plans.yaml"
    plans.write_text(PLANS)
    worker = stack.start_worker(
        stack.meters_file(METERS),
        METERSTREAM_API_READ_AUTH="required",
        METERSTREAM_PLANS_FILE=str(plans),
    )
    now = time.time_ns() // 1_000_000
    first, today = month_days(now)
    events = [
        {"event_name": "ai_tokens", "customer_id": customer, "idempotency_key": f"{customer}-{i}",
         "timestamp": ts, "properties": {"tokens": tokens}}
        for i, (customer, ts, tokens) in enumerate(
            [("acme", first, "1.5"), ("acme", first, 40), ("acme", today, 7),
             ("globex", today, 1000)]
        )
    ]  # fmt: skip
    bad = {"event_name": "ai_tokens", "customer_id": "acme", "idempotency_key": "acme-bad",
           "timestamp": "not a time"}  # fmt: skip
    # Playwright's sync API keeps an event loop running in this thread: produce in another.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(stack.produce, [*events, bad]).result()
    state = stack.tmp / "state"
    admin = keys_cli(state, "create", "operator")

    def count(table: str) -> int:
        answer = requests.post(
            f"{worker.web_url}/v1/sql", json={"sql": f"SELECT count() FROM {table}"},
            headers={"Authorization": f"Bearer {admin}"}, timeout=60,
        )  # fmt: skip
        answer.raise_for_status()
        return int(answer.json()["rows"][0][0])

    wait_until(
        lambda: (count("usage_events") == 4 and count("rejected_events") == 1) or None,
        what="4 events recorded and 1 rejected",
    )
    # The reference, from the events sent: acme's tokens and calls per UTC day.
    tokens: dict[str, Decimal] = defaultdict(Decimal)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e["customer_id"] == "acme":
            day = time.strftime("%Y-%m-%d", time.gmtime(e["timestamp"] / 1000))
            tokens[day] += Decimal(str(e["properties"]["tokens"]))
            calls[day] += 1

    # Prepaid credits: 100 usd granted now; the usage before it is settled from it.
    granted = requests.post(
        f"{worker.web_url}/v1/customers/acme/credits/grants", json={"amount": "100.00"},
        headers={"Authorization": f"Bearer {admin}"}, timeout=60,
    )  # fmt: skip
    assert granted.status_code == 201, granted.text
    cost = sum(tokens.values()) * Decimal("0.02")

    def credits() -> dict[str, Any]:
        answer = requests.get(
            f"{worker.web_url}/v1/customers/acme/credits",
            headers={"Authorization": f"Bearer {admin}"}, timeout=60,
        )  # fmt: skip
        answer.raise_for_status()
        return dict(answer.json())

    wait_until(lambda: Decimal(credits()["balance"]) == 100 - cost, what="credits burned")
    alerts = {"thresholds": [
        {"threshold_id": "low", "kind": "balance_below", "amount": "10"},
        {"threshold_id": "high", "kind": "balance_below", "amount": "1000"},
    ]}  # fmt: skip
    answer = requests.put(
        f"{worker.web_url}/v1/customers/acme/credits/alerts", json=alerts,
        headers={"Authorization": f"Bearer {admin}"}, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text

    made = cli("billing", "link", "acme", "--base-url", worker.web_url, "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith(f"{worker.web_url}/billing/acme#link=msl_")
    token = urllib.parse.parse_qs(url.split("#", 1)[1])["link"][0]

    page = browser.new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(worker.web_url) else None,
    )
    page.goto(url)
    page.wait_for_selector("body[data-loaded=true]", timeout=60_000)
    assert "#link=" not in page.url, "the token stays out of the address bar and history"

    def shown(meter: str) -> dict[str, str]:
        rows = page.locator(f'table[data-meter="{meter}"] tr[data-day]')
        return {
            rows.nth(i).get_attribute("data-day"): rows.nth(i)
            .locator("td[data-value]")
            .inner_text()
            for i in range(rows.count())
        }

    on_page_tokens, on_page_calls = shown("tokens"), shown("calls")
    assert {d: Decimal(v) for d, v in on_page_tokens.items()} == dict(tokens)
    assert {d: Decimal(v) for d, v in on_page_calls.items()} == {
        d: Decimal(n) for d, n in calls.items()
    }
    # ... and they are the API's own strings, as the API returned them.
    month = urllib.parse.quote(time.strftime("%Y-%m-01T00:00:00Z", time.gmtime(first / 1000)))
    daily = api(worker, f"/v1/customers/acme/usage?from={month}&window=day&meter=tokens", token)
    assert daily.status_code == 200, daily.text
    by_day = {
        time.strftime("%Y-%m-%d", time.gmtime(r["period_start_ms"] / 1000)): r["value"]
        for r in daily.json()["usage"]
    }
    assert on_page_tokens == by_day
    total = page.locator('table[data-meter="tokens"] tr[data-total] td[data-value]').inner_text()
    assert Decimal(total) == sum(tokens.values())

    rejected = page.locator("#rejected-body tr[data-key='acme-bad']")
    assert "invalid_event" in rejected.inner_text()
    assert page.locator("#stripe-last").count() == 1
    # The upcoming invoice: the base fee and 48.5 tokens at 0.02, as the API says.
    invoice = page.locator("#invoice-body tr[data-total] td").last.inner_text()
    period = time.strftime("%Y-%m", time.gmtime(first / 1000))
    preview = api(worker, f"/v1/customers/acme/invoice-preview?period={period}", token)
    assert preview.status_code == 200, preview.text
    assert invoice == preview.json()["total"]
    assert Decimal(invoice) == 20 + sum(tokens.values()) * Decimal("0.02")

    # Credits: the balance, the grant and the access, as the API says.
    balance = page.locator("#credits-balance").inner_text()
    assert balance == f"{credits()['balance']} USD" and Decimal(balance.split()[0]) == 100 - cost
    assert page.locator("#credits-access").inner_text() == "yes"
    # The balance over time: the ledger's running sum per day, the last day's is the balance.
    ledger = api(worker, "/v1/customers/acme/credits/ledger", token).json()
    by_day = {d["day"]: d["balance"] for d in ledger["balance_by_day"]}
    shown_days = page.locator("#credits-body tr[data-balance-day]")
    assert {
        shown_days.nth(i).get_attribute("data-balance-day"): shown_days.nth(i)
        .locator("td[data-value]")
        .inner_text()
        for i in range(shown_days.count())
    } == by_day
    assert Decimal(by_day[max(by_day)]) == 100 - cost
    assert sum(Decimal(e["amount"]) for e in ledger["entries"]) == 100 - cost
    assert "armed" in page.locator("#credits-body tr[data-threshold='low']").inner_text()
    assert "fired" in page.locator("#credits-body tr[data-threshold='high']").inner_text()
    grant_id = granted.json()["grant"]["grant_id"]
    assert "100" in page.locator(f"#credits-body tr[data-grant='{grant_id}']").inner_text()

    page.fill("#lookup-key", "acme-1")
    page.click("#lookup-form button")
    page.wait_for_selector("#fate")
    assert page.locator("#fate").inner_text().startswith("counted")
    assert "tokens: took 40" in page.locator("#lookup-result").inner_text()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "billing-page.png"), full_page=True)
    assert outside == [], f"the page loaded something from another origin: {outside}"

    # A phone: nothing wider than the screen.
    phone = browser.new_page(viewport={"width": 375, "height": 740})
    phone.goto(url)
    phone.wait_for_selector("body[data-loaded=true]", timeout=60_000)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 375
    phone.screenshot(path=str(ARTIFACTS / "billing-page-phone.png"), full_page=True)

    # The link reads acme only; an altered or expired one reads nothing.
    assert api(worker, "/v1/customers/globex/usage", token).status_code == 403
    assert api(worker, "/v1/events/globex/globex-3", token).status_code == 403
    sql = requests.post(
        f"{worker.web_url}/v1/sql", json={"sql": "SELECT 1"},
        headers={"Authorization": f"Bearer {token}"}, timeout=60,
    )  # fmt: skip
    assert sql.status_code == 403
    posted = requests.post(
        f"{worker.web_url}/v1/events", json=events[0],
        headers={"Authorization": f"Bearer {token}"}, timeout=60,
    )  # fmt: skip
    assert posted.status_code == 401, "a link never writes"
    _, expires, signature = token.removeprefix(links.PREFIX).split(".")
    altered = f"{links.PREFIX}{links._b64(b'globex')}.{expires}.{signature}"
    assert api(worker, "/v1/customers/globex/usage", altered).status_code == 401
    secret = (state / links.SECRET_FILE).read_text().strip().encode()
    expired = links.sign(secret, "acme", int(time.time()) - 1)
    assert api(worker, "/v1/customers/acme/usage", expired).status_code == 401
    assert requests.get(f"{worker.web_url}/v1/customers/acme/usage", timeout=60).status_code == 401

    # The operator view: an API key typed into the page, any customer.
    operator = browser.new_page()
    operator.goto(f"{worker.web_url}/billing")
    operator.fill("#api-key", admin)
    operator.fill("#customer-id", "globex")
    operator.click("#access-form button")
    operator.wait_for_selector("body[data-loaded=true]", timeout=60_000)
    assert operator.url == f"{worker.web_url}/billing/globex"
    globex = operator.locator('table[data-meter="tokens"] tr[data-total] td[data-value]')
    assert Decimal(globex.inner_text()) == 1000
    operator.screenshot(path=str(ARTIFACTS / "billing-operator.png"), full_page=True)
    assert (
        json.loads(api(worker, "/v1/customers/globex/stripe-status", admin).text)["customer_id"]
        == "globex"
    )
