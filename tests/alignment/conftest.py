"""Shared fixtures for the alignment tests: one tiny random-init Llama per test session, built offline from the
telecom sample's raw texts (about 2 s), so every stage trains and generates with a real model and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core CI box extra threads only contend
    (measured: 30 training steps took 0.2 s on one thread, 17 s on two with another process running)."""
    import torch

    torch.set_num_threads(1)

SAMPLE_RAW = Path(__file__).resolve().parents[2] / "samples" / "telecom" / "raw"


@pytest.fixture(scope="session")
def tiny_corpus_files() -> list[Path]:
    """The sample's documents (.md/.txt) and its support chats (JSONL: every string value is text)."""
    docs = sorted(p for p in (SAMPLE_RAW / "docs").iterdir() if p.suffix in (".md", ".txt"))
    return [*docs, SAMPLE_RAW / "chats" / "transcripts.jsonl"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_corpus_files) -> Path:
    """A folder with a tiny Llama (hidden 64, 2 layers, vocab 1024, ChatML template with generation markers).

    Shared by the whole session: treat it as read-only (copy it, or save elsewhere, before changing anything)."""
    from alignment.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_corpus_files)
