"""Scoped monkeypatches: the one way this project replaces a library attribute for a while.

A patch that silently does not apply measures or computes something else (a fake-tensor estimate that
materialises a mask a real run never builds, a GaLore step that raises on CPU), and a patch that is not
put back changes every later caller in the process. `patched` therefore refuses a target that does not
exist, restores the original on every exit, and complains if someone else replaced the attribute
while ours was in place (restoring would then silently undo their patch).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def patched(owner, name: str, replacement, *, why: str):
    """`owner.<name> = replacement` for the body of the `with`; yields the original.

    AttributeError when `owner` has no attribute `name` (`why` says what the patch is for, so the message
    says what would go wrong without it); RuntimeError after the body when the attribute was no longer
    `replacement` at exit.
    """
    if not hasattr(owner, name):
        raise AttributeError(f"cannot patch {owner.__name__}.{name}: it does not exist in this version "
                             f"(the patch is needed because {why})")
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        replaced_by_someone_else = getattr(owner, name) is not replacement
        setattr(owner, name, original)
    if replaced_by_someone_else:
        raise RuntimeError(f"{owner.__name__}.{name} was patched again while our patch was in place "
                           f"({why}); the original has been put back")
