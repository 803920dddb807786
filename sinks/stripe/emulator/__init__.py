"""The local Stripe Billing emulator (``meterstream stripe-emulator``)."""
