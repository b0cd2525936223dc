"""Small helpers shared by the bench scripts (arXiv 2106.02852 reproduction): a log that goes to the terminal and to
<folder>/log.txt, and matplotlib when it is installed (requirements-bench.txt)."""
import json
import os


def read_json(path):
    """The JSON object in path (the file closed after reading)."""
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """obj to path as indented JSON (the file closed after writing)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def folder_log(folder):
    """A log(msg) that prints and appends to <folder>/log.txt (the folder is created)."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()
    return log


def add_semantics_args(p, score_help, scores):
    """The v1 benches' --tokens (default "removed", the semantics of their committed results) and --score, one of
    scores (default by semantics: see score_of)."""
    p.add_argument("--tokens", default="removed", choices=["frozen", "removed"],
                   help="what a pruned patch becomes: removed (v1, C1; the committed results) or frozen (the "
                   "paper's, P1)")
    p.add_argument("--score", default=None, choices=list(scores), help=score_help + " (default: head-mean, v1's 'significance', with "
                   "--tokens removed; significance, Eq. 6, with --tokens frozen)")


def score_of(args):
    """The score a v1 bench runs: --score, else the one that goes with --tokens."""
    return args.score or ("head-mean" if args.tokens == "removed" else "significance")


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a message) when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no plot written")
        return None
    return plt
