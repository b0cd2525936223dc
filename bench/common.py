"""Small helpers shared by the bench scripts (arXiv 2106.02852 reproduction): a log that goes to the terminal and to
<folder>/log.txt, and matplotlib when it is installed (requirements-bench.txt)."""
import os


def folder_log(folder):
    """A log(msg) that prints and appends to <folder>/log.txt (the folder is created)."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()
    return log


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
