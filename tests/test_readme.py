"""Every Python example in README.md runs.

Each fenced ```python block of README.md is run verbatim, in a fresh interpreter (this one's
``sys.executable``), from an empty temporary directory, with one intra-op thread. A block is
named by its index among the README's Python blocks and the nearest Markdown heading above it,
e.g. ``block2-symmetries-stationary-conditions-and-collapse-metrics``.

A block is run unless it is listed in ``NOT_RUN`` with a reason (it needs a data set, a GPU,
minutes of runtime, or is a deliberate fragment); those show up as skipped, never silently
dropped. ``test_every_block_is_accounted_for`` fails when a README block is neither run nor
listed, when a ``NOT_RUN``/``XFAIL``/``CHECKS`` entry matches no block, or when a non-Python
block calls ``python -c`` (which this file does not run).

Keys of ``NOT_RUN``, ``XFAIL`` and ``CHECKS``: a block index (int), a heading (str, every block
under it), or a block id (str).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_LANGS = {"python", "py", "python3", "pycon"}
TIMEOUT_S = 180  # generous: the slowest block takes ~6 s warm, ~11 s with a cold inductor cache

# Blocks that legitimately cannot run here: {index | heading | id: reason}.
NOT_RUN: dict = {}

# Blocks known to be wrong in the README, run under xfail(strict=True): {key: reason}.
XFAIL: dict = {}

# Sanity checks beyond exit status 0, per block: "stdout" lists substrings stdout must contain;
# "after" is code run in the block's namespace once the block has finished (it may not change
# what the block does, only look at its results). Every block's stdout must also contain no NaN.
CHECKS = {
    "API": {
        "after": """
assert torch.isfinite(loss), loss
assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (w, u))
torch.testing.assert_close(symfast.dcs(w, u, v, mask), symfast.reference.dcs(w, u, v, mask))
""",
    },
    "API tour: convert, train, export": {
        "stdout": ["converted", "symfast.sparsity_report"],
        "after": """
x = torch.randn(8, 784)
with torch.no_grad():
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
""",
    },
    "Symmetries, stationary conditions and collapse metrics": {
        "stdout": ["[found] permutation", "PASS", "on the stationary condition: True"],
    },
    "Per-sample curvature and collapse prediction": {
        "after": """
assert h.shape == (256,) and torch.isfinite(h).all(), h
assert not torch.isnan(torch.as_tensor(symfast.critical_weight_decay(h)))
# The block's closing comment: E[h] > 0 at this init (robust over seeds), so the mirror attracts
# SGD at every learning rate: Lambda(0.1) < 0, lambda* = 0, and eq. 9 is negative.
assert h.mean() > 0, h.mean()
assert symfast.lyapunov_exponent(h, 0.1) < 0
assert symfast.critical_learning_rate(h) == 0
assert symfast.approx_critical_learning_rate(h) < 0
print("readme-check: ok")
""",
        "stdout": ["readme-check: ok"],
    },
}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "top"


def _fenced_blocks(text):
    """[(lang, code, heading, line)] for every fenced block; headings inside blocks are ignored."""
    blocks, heading, fence, lang, start, body = [], "", None, "", 0, []
    for lineno, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = _FENCE.match(line)
            if m:
                fence, lang, start, body = m.group(1), m.group(2).lower(), lineno, []
                continue
            h = _HEADING.match(line)
            if h:
                heading = h.group(2)
        elif line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((lang, "\n".join(body) + "\n", heading, start))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: fence opened at line {start} is never closed"
    return blocks


def _python_blocks():
    """[(index, id, heading, line, code)] for the README's Python blocks."""
    out = []
    for lang, code, heading, line in _fenced_blocks(README.read_text(encoding="utf-8")):
        if lang in PYTHON_LANGS:
            i = len(out)
            out.append((i, f"block{i}-{_slug(heading)}", heading, line, code))
    return out


BLOCKS = _python_blocks()


def _lookup(table, index, block_id, heading):
    for key in (block_id, index, heading):
        if key in table:
            return table[key]
    return None


def _key_matches(key, block):
    index, block_id, heading, _, _ = block
    return key in (index, block_id, heading)


def _params():
    params = []
    for block in BLOCKS:
        index, block_id, heading, _, _ = block
        marks = []
        skip = _lookup(NOT_RUN, index, block_id, heading)
        if skip is not None:
            marks.append(pytest.mark.skip(reason=f"NOT_RUN: {skip}"))
        xfail = _lookup(XFAIL, index, block_id, heading)
        if xfail is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=xfail))
        params.append(pytest.param(block, id=block_id, marks=marks))
    return params


@pytest.mark.parametrize("block", _params())
def test_readme_block(block, tmp_path):
    index, block_id, heading, line, code = block
    check = _lookup(CHECKS, index, block_id, heading) or {}
    script = tmp_path / f"readme_block{index}.py"
    script.write_text(code + check.get("after", ""), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md block {index} (line {line}, under '{heading}') ran past {TIMEOUT_S} s")
    where = f"README.md block {index} (line {line}, under '{heading}')"
    assert proc.returncode == 0, (
        f"{where} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    assert not re.search(r"\bnan\b", proc.stdout, re.I), f"{where} printed NaN:\n{proc.stdout[-4000:]}"
    for text in check.get("stdout", []):
        assert text in proc.stdout, f"{where}: {text!r} not in its output:\n{proc.stdout[-4000:]}"


def test_every_block_is_accounted_for():
    assert len(BLOCKS) >= 4, f"found only {len(BLOCKS)} Python blocks in README.md: parser broken?"
    for name, table in (("NOT_RUN", NOT_RUN), ("XFAIL", XFAIL), ("CHECKS", CHECKS)):
        for key in table:
            assert any(_key_matches(key, b) for b in BLOCKS), (
                f"{name} key {key!r} matches no Python block of README.md (ids: {[b[1] for b in BLOCKS]})")
    for key, reason in NOT_RUN.items():
        assert isinstance(reason, str) and reason.strip(), f"NOT_RUN[{key!r}] needs a reason"
    ran = {p.id for p in _params() if not any(m.name == "skip" for m in p.marks)}
    for index, block_id, heading, line, _ in BLOCKS:
        listed = _lookup(NOT_RUN, index, block_id, heading) is not None
        assert block_id in ran or listed, f"README.md block {block_id} (line {line}) is neither run nor in NOT_RUN"
    # Python hidden in other blocks (```bash with `python -c ...`) is not run by this file.
    for lang, code, heading, line in _fenced_blocks(README.read_text(encoding="utf-8")):
        if lang not in PYTHON_LANGS:
            assert not re.search(r"\bpython3?\s+-c\b", code), (
                f"README.md line {line} ({lang or 'plain'} block under '{heading}') runs `python -c`: "
                "extend tests/test_readme.py to run it, or document why not")
