"""preft: prefill-only adapters (PreFT), trained and served with the same semantics."""

__version__ = "0.1.0"
