"""Regenerate the command samples in the docs by running them.

    python tools/doc_samples.py [--fixtures FOLDER] [--check]

A sample in a Markdown file is a marker line followed by a fenced block:

    <!-- sample: rwkv-lite generate -p "And God said" -n 80 --greedy -->
    ```
    $ rwkv-lite generate -p "And God said" -n 80 --greedy
    And God said, ...
    ```

The block is rewritten as `$ COMMAND` and what the command printed: stdout, and with a trailing `2>&1` also
stderr, after stdout. Commands run through bash in a scratch folder that holds the files the samples name:
`tiny.safetensors` (the rwkv.cpp test model tiny-rwkv-5v2-730K converted to fp32) and `english-gpl3-8k.txt`,
both made from the fixtures folder (default: `shared/fixtures` next to the repository). Samples that time
something say so in the text around them, with the CPU they were made on (printed by this script).
--check regenerates nothing and exits 1 if a deterministic sample (one with --greedy) no longer matches.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "docs" / "cli.md", REPO / "docs" / "demo-model.md"]
MARKER = re.compile(r"^<!-- sample: (?P<command>.+?) -->\n```\n(?P<body>.*?)```\n", re.S | re.M)


def samples(text: str):
    """(match, command) for every sample block of a Markdown text, in order."""
    return [(m, m["command"]) for m in MARKER.finditer(text)]


def deterministic(command: str) -> bool:
    return "--greedy" in command or "--temperature 0 " in command


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def make_workdir(fixtures: Path) -> Path:
    """A scratch folder with the files the samples name."""
    sys.path.insert(0, str(REPO))
    import rwkv_lite
    work = Path(tempfile.mkdtemp(prefix="rwkv-lite-samples-"))
    rwkv_lite.convert(fixtures / "rwkv-cpp-tiny" / "tiny-rwkv-5v2-730K-FP32.bin", work / "tiny.safetensors",
                      quant="fp32")
    shutil.copy(fixtures / "text" / "english-gpl3-8k.txt", work / "english-gpl3-8k.txt")
    return work


def run_sample(command: str, work: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    with_stderr = command.endswith(" 2>&1")
    if with_stderr:                 # stdout, then stderr on lines of their own (a terminal would interleave them)
        command = command[:-len(" 2>&1")]
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=work, env=env, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"sample failed ({proc.returncode}): {command}\n{proc.stderr}")
    out = proc.stdout
    if out and not out.endswith("\n"):
        out += "\n"
    return out + (proc.stderr if with_stderr else "")


def block(command: str, output: str) -> str:
    return f"<!-- sample: {command} -->\n```\n$ {command}\n{output}```\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures")
    parser.add_argument("--check", action="store_true", help="compare the deterministic samples only")
    args = parser.parse_args()
    work = make_workdir(args.fixtures)
    failed = 0
    try:
        for doc in DOCS:
            text = doc.read_text(encoding="utf-8")
            pieces, last = [], 0
            for match, command in samples(text):
                if args.check and not deterministic(command):
                    continue
                output = run_sample(command, work)
                new = block(command, output)
                if args.check and new != match[0]:
                    print(f"{doc.name}: sample differs: {command}")
                    failed += 1
                pieces += [text[last:match.start()], new]
                last = match.end()
            pieces.append(text[last:])
            if not args.check:
                doc.write_text("".join(pieces), encoding="utf-8")
                print(f"{doc.relative_to(REPO)}: {len(samples(text))} samples regenerated")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU: {cpu_name()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
