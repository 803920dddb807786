"""A local emulator of Stripe's Billing meter API (aiohttp), for tests and the embedded stack.

It speaks what the official ``stripe`` SDK (``StripeClient``) sends: v1 bodies
are form-encoded with bracket notation (``payload[value]=12``), v2 bodies are
JSON, and every API route needs ``Authorization: Bearer <key>``. It enforces
Stripe's documented rules so the pipeline meets them before production does:

* ``identifier`` at most 100 characters and unique over a rolling 24 hours
  (v1 and v2 share one store);
* ``timestamp`` within the past 35 days and at most 5 minutes ahead;
* payload values are strings; the meter's customer key and value key must be
  present, and the value is a whole number: ``-?[0-9]+`` (Stripe's docs:
  "only accepts whole number values"; negative values are accepted, as
  Stripe floors a negative cycle total at 0 on the invoice, so ``"1.5"``,
  ``"1e3"``, ``"+1"`` and ``" 1"`` are refused);
* ``event_name`` must belong to an active meter; meter event names are
  unique among active meters.

Error bodies are Stripe-shaped (``{"error": {"type", "code", "message",
"param"}}``). Codes, and where they come from:

* ``parameter_missing``, ``parameter_invalid_integer``,
  ``parameter_invalid_string_empty``, ``resource_missing``,
  ``resource_already_exists``, ``rate_limit`` — Stripe's general API error
  codes (the ``code`` enum in the stripe-python SDK).
* ``no_meter``, ``meter_event_no_customer_defined``,
  ``meter_event_invalid_value``, ``meter_event_value_too_many_digits``,
  ``timestamp_too_far_in_past``, ``timestamp_in_future`` — the codes Stripe
  uses for these very conditions in its meter error reports
  (``v1.billing.meter.error_report_triggered``, stripe-python 16.x). Real
  Stripe reports some of them asynchronously; the emulator answers
  synchronously so tests see them at once.
* A repeated identifier: ``400 invalid_request_error`` with the message
  ``An event already exists with identifier <id>.`` and **no code**, which is
  what Stripe is observed to return (integrations match on this message).
* An unknown customer, only while the customer registry is non-empty:
  ``resource_missing`` (``No such customer: '<id>'``); a customer is known when
  registered (``/_emulator/customers``) or made by ``POST /v1/customers``. Real
  Stripe accepts the event and reports ``meter_event_customer_not_found``
  asynchronously.
* An expired v2 meter event session: ``401``, type
  ``temporary_session_expired``, code ``billing_meter_event_session_expired``.

Meter event adjustments (``POST /v1/billing/meter_event_adjustments``, form;
``POST /v2/billing/meter_event_adjustments``, JSON; both ``type=cancel`` with
``cancel[identifier]``) cancel one accepted event, found by ``event_name`` and
``identifier``, within 24 hours of its receipt (emulator clock). A cancelled
event stays in ``/_emulator/events`` (``cancelled: true``) but no longer counts
in event summaries; its identifier stays taken for the rest of its 24 hours.
The answer is Stripe's object with ``status: "pending"`` (Stripe applies
adjustments asynchronously; the emulator applies them at once). As Stripe
documents them, the v1 ``billing.meter_event_adjustment`` has no ``id``; the
v2 ``v2.billing.meter_event_adjustment`` has ``id`` and ``created``. Errors:

* a missing ``event_name``/``type``/v1 ``cancel[identifier]``:
  ``parameter_missing``; a ``type`` other than ``cancel``: no code (Stripe's
  usual answer to an invalid enum value);
* v2 without ``cancel.identifier``: ``invalid_cancel_configuration``, the one
  error code Stripe documents for this endpoint (OpenAPI
  ``v2.error.invalid_cancel_configuration``);
* no meter has that ``event_name``: ``no_meter``, as for meter events;
* no event with that identifier under that ``event_name`` (unknown, or sent
  under another event name): ``resource_missing``;
* the event was received more than 24 hours ago, or is already cancelled:
  ``400 invalid_request_error`` with **no code** and a descriptive message.
  Stripe documents the 24-hour limit but no code or message for these cases,
  so these messages are the emulator's own.

Products and prices (``POST /v1/products``, ``GET /v1/products/{id}``, ``POST`` and
``GET /v1/prices``) and the upcoming invoice of a customer on a list of prices
(``POST /v1/invoices/create_preview``, ``GET /v1/invoices/upcoming``), priced from the
meter events received by Stripe's tier rules: sinks/stripe/emulator/prices.py.

Payments, for prepaid credits: customers and Stripe's test payment methods
(sinks/stripe/emulator/customers.py), PaymentIntents created and confirmed with
Stripe's answers, a declined card's ``402 card_error`` included
(sinks/stripe/emulator/payment_intents.py), the events they make and webhook
endpoints (sinks/stripe/emulator/webhooks.py), and the asynchronous, signed,
retried webhook delivery with its faults (sinks/stripe/emulator/delivery.py;
configured at start by sinks/stripe/emulator/options.py).

With a state file (``--state-file``, what ``meterstream run`` uses) the
emulator keeps what an account keeps across restarts (meters, meter events,
products, prices, identifiers, customers, idempotent replies, payment methods,
PaymentIntents, events, webhook endpoints and the deliveries still owed;
sinks/stripe/emulator/journal.py); without one (tests' ``BackgroundEmulator``)
it starts empty.

Event summaries aggregate by the meter's formula; ``last`` is Stripe's rule, the
value of the event with the latest timestamp. Stripe does not define which of several
events with that same timestamp wins, so the emulator flags such a tie (stats
``last_ties``, ``GET /_emulator/ties``) and answers the earliest received of them.

Test controls live under ``/_emulator``: accepted events, stats, reset,
customer registry, `last` ties, the clock (``POST /_emulator/clock
{"advance_seconds": N}`` moves the emulator's time forward, for the 24-hour and
35-day limits), fault injection (429/500 with a seeded RNG, latency), a
per-second rate limit, webhook delivery faults (duplicates, out of order, dropped
attempts, delay), the webhook attempts made and the release of held webhooks.
Faults are injected before anything is recorded: a faulted request accepts nothing.

The controls need no key, and the accepted events carry customer ids and usage,
so the emulator is guarded like the worker's web server (pipeline/hosts.py): it
answers only to loopback names (plus IP addresses and ``--allowed-hosts`` names
when it listens beyond loopback), so a web page cannot reach it by DNS rebinding;
and a control that changes something (POST, DELETE) needs ``Content-Type:
application/json``, which a cross-site page cannot send without a CORS preflight
that the emulator does not grant.
"""
