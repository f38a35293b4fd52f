"""Summarise py-spy's raw (collapsed) stacks: where a worker's CPU time goes.

    python bench/flame_summary.py bench/results/py-spy-*.txt [--top 25]

Prints the share of samples by thread role (the outermost frames say which:
the turn producer, the turn monitor, a request thread, gunicorn's main loop),
then the functions with the most samples inclusive and self.
"""
import argparse
import collections
import re

ROLES = (  # first match wins, looked for in the whole stack
    ("turn producer thread", "Producers._serve"),
    ("turn monitor", "Monitor._run"),
    ("request thread: opening the upstream call", "Turn.start ("),
    ("request thread: starting a turn (the rest)", "chat_stream"),
    ("request thread: reading the upstream", "Turn._step ("),
    ("request thread: relaying (SSE)", " sse ("),
    ("request thread: other", "handle_request"),
    ("gunicorn main loop", "run_for_one"),
)


def frames(stack):
    return [f for f in stack.split(";") if f]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    total = 0
    roles, inclusive, own = collections.Counter(), collections.Counter(), collections.Counter()
    for name in args.files:
        with open(name) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                count = int(count)
                total += count
                role = next((r for r, mark in ROLES if mark in stack), "other")
                roles[role] += count
                names = [re.sub(r":\d+\)$", ")", f) for f in frames(stack)]
                for fn in set(names):
                    inclusive[fn] += count
                if names:
                    own[names[-1]] += count
    print(f"{total} samples")
    for role, n in roles.most_common():
        print(f"  {100 * n / total:5.1f} %  {role}")
    print("\ninclusive:")
    for fn, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f} %  {fn}")
    print("\nself:")
    for fn, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f} %  {fn}")


if __name__ == "__main__":
    main()
