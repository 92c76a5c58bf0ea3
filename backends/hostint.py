"""Ceiling division and powers of two for host integers, shared by the forms' launch code (pasted into generated
modules before the forms that use it).

Not ``triton.cdiv`` or ``triton.next_power_of_2``: in newer Triton those are constexpr functions, microseconds a
call on the host, and a short call launches several kernels.
This file needs nothing; `mixc compile` pastes it into the generated module.
"""


def _cdiv(a, b):
    """ceil(a / b) for host ints."""
    return -(-a // b)


def _pow2(n):
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
