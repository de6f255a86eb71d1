import pytest
import torch

from rwkv_lm.model import RWKV, RWKVConfig
from rwkv_lm.testing import random_model, rel_err


def assert_close(actual, expected, rtol, name="value"):
    """Relative error against the reference's largest magnitude (NaN never passes); the message shows both."""
    err = rel_err(actual, expected)
    assert err < rtol, f"{name}: max|diff| / max|ref| = {err:.3e} >= {rtol:.0e}"
    return err


@pytest.fixture
def refusing_compiler(tmp_path, monkeypatch):
    """Puts a `cc` first on PATH that refuses one option (as a compiler without it does) and passes everything
    else to the real one, noting each command line; HOME goes to tmp_path (a kernel cache of its own). Call it with
    the option and the error line; it returns the file of the noted command lines."""
    import os
    import shutil
    import stat

    def install(option: str, error: str):
        calls, fake = tmp_path / "calls", tmp_path / "bin" / "cc"
        fake.parent.mkdir()
        fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\ncase \" $* \" in *\" {option} \"*) echo \"{error}\" >&2; "
                        f"exit 1;; esac\nexec {shutil.which('cc')} \"$@\"\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("HOME", str(tmp_path))
        return calls

    return install


@pytest.fixture(scope="session")
def world():
    """The RWKV World tokenizer (65530 tokens)."""
    from rwkv_lm.tokenizer import load_tokenizer

    return load_tokenizer("world")


@pytest.fixture
def tiny_config():
    return RWKVConfig(vocab_size=101, n_layer=3, n_embd=64, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=12)


@pytest.fixture
def tiny_model(tiny_config):
    return random_model(tiny_config)
