"""Summarise a py-spy raw profile (``bench.run --profile FILE``, collapsed stacks).

``python -m bench.profile FILE [--top N] [--thread NAME]``

Prints samples per thread, then the top functions by inclusive and by self
share of the chosen thread's samples (default: every thread). Frames are
``function (file:line)``; lines are dropped so a function is counted once.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    return _FRAME_LINE.sub(")", frame.strip())


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match:
            stacks.append((match.group(1).split(";"), int(match.group(2))))
    return stacks


def summarise(path: Path, top: int, thread: str | None) -> list[str]:
    stacks = load(path)
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for frames, n in stacks:
        # with --threads py-spy puts the thread first (after the process, if any)
        head = next((f for f in frames[:2] if f.startswith("thread ")), "")
        threads[head] += n
        if thread and thread not in head:
            continue
        total += n
        funcs = [_function(f) for f in frames if not f.startswith(("thread ", "process "))]
        for f in set(funcs):
            inclusive[f] += n
        if funcs:
            self_[funcs[-1]] += n
    out = [f"{path}: {sum(threads.values())} samples"]
    out += [f"  {n:7d}  {name or '(no thread)'}" for name, n in threads.most_common()]
    out.append(f"\ninclusive, % of {total} samples{' in ' + thread if thread else ''}:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out.append("\nself:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_.most_common(top)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--thread", default=None, help="only stacks whose thread contains this")
    args = p.parse_args()
    print("\n".join(summarise(args.file, args.top, args.thread)))


if __name__ == "__main__":
    main()
