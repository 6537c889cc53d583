"""What the experiment scripts share: running the project's own scripts as a user would."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv):
    """Run a script of the repository (`run("qtune.py", "--iters", "10")`), print its command line,
    return its standard output; stop the experiment with the script's last output if it fails."""
    print("$ python " + " ".join(argv), flush=True)
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout
