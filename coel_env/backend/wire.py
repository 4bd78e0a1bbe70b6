"""The expert-dispatch wire format both backends count (DeepEP-style per-destination dispatch).

At each MoE layer a server sends a token's hidden state once to every *remote destination server* that computes at
least one of its top-k experts, and gets one combined row back (the weighted sum of those experts' outputs):
- request row: the hidden state (d_model * activation_bytes) and top_k fixed slots of `row_header_bytes` each
  (an expert id and its gate weight; unused slots padded), so rows have one size whatever experts they carry;
- reply row: the combined output (d_model * activation_bytes);
- each message (one per layer, destination and direction, only when it has rows) carries an 8-byte arrival stamp.
Pruning drops whole rows of a message, fusion merges rows of a message; both count rows after compression.
The real dispatcher's slot is `SLOT_BYTES`: an int32 expert id (-1: unused) and the fp32 gate weight (0: unused).
The surrogate prices the expectation of `destination_rows` (`physics.route_pass`); the real dispatcher sends exactly
`dispatch_bytes` of what it routes (tests/real_backend/test_real_dist.py checks both).
"""

from __future__ import annotations

import numpy as np

STAMP_BYTES = 8  # one float64 arrival time per message
SLOT_BYTES = 8  # the real dispatcher's expert slot: int32 expert id + fp32 gate weight (hardware row_header_bytes)


def request_row_bytes(d_model: int, activation_bytes: int, row_header_bytes: int, top_k: int) -> int:
    """Bytes of one request row: the hidden state and its top_k slot headers."""
    return d_model * activation_bytes + top_k * row_header_bytes


def reply_row_bytes(d_model: int, activation_bytes: int) -> int:
    """Bytes of one reply row: the combined output."""
    return d_model * activation_bytes


def row_round_trip_bytes(d_model: int, activation_bytes: int, row_header_bytes: int, top_k: int) -> int:
    """Bytes one row costs there and back: two hidden states and the request's top_k slot headers."""
    return request_row_bytes(d_model, activation_bytes, row_header_bytes, top_k) + reply_row_bytes(
        d_model, activation_bytes
    )


def destination_rows(target: np.ndarray, idx: np.ndarray, me: int, num_servers: int) -> np.ndarray:
    """[S] rows server `me` sends to each server for one layer before compression: tokens with at least one expert
    there. target [E]: server computing each expert for `me`'s tokens (-1: no live holder, nothing is sent);
    idx [T, k]: each token's expert ids."""
    dest = target[idx]  # [T, k]
    hit = np.zeros((idx.shape[0], num_servers + 1), dtype=bool)  # the last column collects -1
    np.put_along_axis(hit, np.where(dest < 0, num_servers, dest), True, axis=1)
    rows = hit[:, :num_servers].sum(0)
    rows[me] = 0
    return rows


def dispatch_bytes(rows: np.ndarray, messages: np.ndarray, row_bytes: int) -> np.ndarray:
    """Bytes on the wire per destination (both directions) for `rows` [S] sent in `messages` [S] request messages."""
    return rows * row_bytes + 2 * STAMP_BYTES * messages
