"""Every shell command in README.md and train/README.md runs as written on a fresh clone: a temporary copy of
the checkout's files (no runs/, no caches), with stand-ins for the files a user downloads from the hub.
Training runs are shortened with --trainer.max_steps; servers run until they answer, then stop. A command
this machine cannot run (8 GPUs, two machines, installing packages) is listed in NOT_RUN with the reason,
so a new command in the docs is run unless someone says why not. Also: `make demo` sets up once, then serves
without running pip again."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.testing import random_model

from test_demo import free_port

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "train/README.md"]
SHORTEN = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
NOT_RUN = {  # a command matching the pattern -> why this test does not run it
    r"^make test\b": "the test suite itself",
    r"^pip install": "installs packages: `make setup-test` did, into the environment running this test",
    r"^hf download": "downloads from the Hugging Face hub: the test puts stand-ins where the files would go",
    r"--trainer\.devices 8": "needs 8 GPUs",
    r"--device cuda": "needs a CUDA GPU",
    r"^MASTER_ADDR=": "needs two machines with 8 GPUs each",
    r"--config \.\.\.": "elided (`...`): the strategies that follow the full command",
    r"--replicas": "starts a Ray cluster of replicas: tests/test_serve_cluster.py deploys the same app",
    r"^serve (deploy|run)\b": "Ray's own CLI, for a Ray cluster left running (tests/test_serve_cluster.py deploys its config)",
}
SERVERS = {r"^make demo\b": "python -m demo", r"^python -m demo\b": None, r"^rwkv-lm serve\b": None}


def doc_commands(doc: str) -> list[str]:
    """The shell commands of a Markdown file's ```bash blocks: one per line (continuations joined, comments
    dropped), a block with a `for` loop as one script."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S):
        lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
        lines = [line for line in lines if line]
        if any(line.startswith("for ") for line in lines):
            commands.append("\n".join(lines))
        else:
            commands.extend(lines)
    return commands


def fresh_clone(directory: Path) -> Path:
    """The files git would check out (tracked, and new ones not ignored), copied with their times."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, directory / name)
    return directory


def put_stand_ins(clone: Path) -> None:
    """What the Models section downloads: a random official-layout RWKV-7 with the World vocabulary (2 layers
    of 64, under the downloaded file's name) and a tiny random transformers model with its tokenizer."""
    from test_hf import save_tiny_hf

    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=64, head_size=64, decay_lora=8, iclr_lora=8, value_lora=4,
                     gate_lora=8)
    rwkv_lm.export_official(random_model(cfg, seed=5), clone / "RWKV-x070-World-0.1B-stand-in.pth", dtype=torch.float32)
    save_tiny_hf(clone / "SmolLM2-135M")


def as_run_here(command: str, port: int) -> str:
    """The command shortened or pointed at a free port, as this test runs it."""
    for pattern, replacement in SERVERS.items():
        if re.search(pattern, command) and replacement:
            command = re.sub(pattern, replacement, command)
    command = re.sub(r"\s\[[^]]*\]", "", command)  # optional arguments in [brackets]: the usage, not the command
    command = re.sub(r"--port \d+", f"--port {port}", command)
    return re.sub(r"(python -m train fit [^\n]*)", lambda m: m.group(1) + " " + " ".join(SHORTEN), command)


def run_server(command: str, env: dict, clone: Path, port: int) -> None:
    """Start a serving command, wait until it answers on `port`, stop it."""
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=clone, env={**env, "GRADIO_SERVER_PORT": str(port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command!r} ended with {proc.returncode}:\n{proc.stdout.read().decode()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                time.sleep(1)
        pytest.fail(f"{command!r} did not answer on port {port} within 300 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def test_every_command_in_the_readmes_runs_on_a_fresh_clone(tmp_path):
    pytest.importorskip("transformers")
    clone = fresh_clone(tmp_path / "clone")
    put_stand_ins(clone)
    env = {**os.environ, "PYTHONPATH": str(clone), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    ran, skipped = [], []
    for doc in DOCS:
        for command in doc_commands(doc):
            reason = next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)), None)
            if reason:
                skipped.append((command, reason))
                continue
            port = free_port()
            here = as_run_here(command, port)
            if any(re.search(pattern, command) for pattern in SERVERS):
                run_server(here, env, clone, port)
            else:
                done = subprocess.run(["bash", "-e", "-c", here], cwd=clone, env=env, input="Hello\n/quit\n",
                                      capture_output=True, text=True, timeout=900)
                assert done.returncode == 0, f"{doc}: {command!r} failed ({here!r}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                assert "Traceback" not in done.stderr, f"{doc}: {command!r}:\n{done.stderr[-3000:]}"
                assert "/-2" not in done.stdout + done.stderr, "the progress bar counts epochs of a step-bounded run"
            ran.append(command)
    print(f"ran {len(ran)} commands; not run: " + "; ".join(f"{c!r} ({why})" for c, why in skipped))
    assert any("--model.tune lora" in c for c in ran) and any(c.startswith("rwkv-lm serve") for c in ran)


def test_make_demo_sets_up_once_and_then_serves_without_pip(tmp_path):
    """The Makefile against a stand-in venv whose python logs what it is asked to do."""
    shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    log = tmp_path / "python.log"
    python = tmp_path / "venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    python.chmod(0o755)

    def make_demo() -> list[str]:
        log.write_text("")
        subprocess.run(["make", "-s", "demo", "VENV=venv"], cwd=tmp_path, check=True, capture_output=True)
        return log.read_text().splitlines()

    first = make_demo()
    assert any(line.startswith("-m pip install -q -e .[train,demo,serve]") for line in first), first
    assert make_demo() == ["-m demo"], "nothing changed: no pip, straight to the demo"
    os.utime(tmp_path / "pyproject.toml", (time.time() + 5, time.time() + 5))
    assert any("pip install" in line for line in make_demo()), "a changed pyproject.toml sets up again"
