"""Token folders: `lte-ray data prepare` (byte, char, BPE) writes the smallest dtype and round-trips
exactly; its user mistakes are one line and leave no folder; `data.name=tokens` memory-maps the
files; the in-memory `text` sources hold small dtypes and give the same windows as before; four
heads on one node map the token file instead of copying it; and a GPT trained on Ray on
memory-mapped Shakespeare BPE beats the corpus's unigram entropy."""

import json
import math
import os
import time
from collections import Counter

import numpy as np
import pytest
import ray
import torch

from lte_ray import tokens
from lte_ray.cli import main
from lte_ray.config import ConfigError
from lte_ray.data import load_data, shakespeare_files
from lte_ray.datasets import DataError
from lte_ray.resolve import build_config

ONE = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"
TWO = "The slings and arrows of outrageous fortune — café, naïve, Ærø.\n" * 40


@pytest.fixture
def corpus(tmp_path):
    """Two files in a folder (read in sorted order, one newline between them)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(ONE * 30, encoding="utf-8")
    (folder / "b.txt").write_text(TWO, encoding="utf-8")
    return folder


def _prepare(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["data", "prepare", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _read(folder, meta) -> np.ndarray:
    return np.concatenate([np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])


@pytest.mark.parametrize("kind, dtype", [("byte", "uint8"), ("char", "uint8"), ("bpe", "uint16")])
def test_prepare_writes_the_smallest_dtype_and_round_trips(tmp_path, capsys, corpus, kind, dtype):
    out = tmp_path / "tok"
    extra = ["--vocab-size", "300"] if kind == "bpe" else []
    rc, stdout, stderr = _prepare(capsys, "--input", str(corpus), "--tokenizer", kind, "--output", str(out), *extra)
    assert rc == 0 and "read 2 files" in stderr
    meta = json.loads((out / "meta.json").read_text())
    raw = (ONE * 30 + "\n" + TWO).encode("utf-8")
    text = raw.decode("utf-8")
    ids = _read(out, meta)
    n = meta["tokens"]
    assert meta["tokenizer"] == kind and meta["dtype"] == dtype and ids.dtype == np.dtype(dtype)
    assert meta["source_bytes"] == len(raw) and meta["sources"] == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert n["train"] + n["val"] == len(ids) and n["val"] == int(len(ids) * 0.1)
    assert (out / "train.bin").stat().st_size == n["train"] * np.dtype(dtype).itemsize
    counts = np.array(list(Counter(ids[: n["train"]].tolist()).values())) / n["train"]
    assert meta["unigram_entropy_nats"] == pytest.approx(-(counts * np.log(counts)).sum(), rel=1e-9)
    assert ids.max() < meta["vocab_size"]
    if kind == "byte":
        assert meta["vocab_size"] == 256 and ids.tobytes() == raw
    elif kind == "char":
        assert meta["vocab"] == sorted(set(text)) and "".join(meta["vocab"][i] for i in ids) == text
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        assert meta["vocab_size"] == tok.get_vocab_size() == 300
        assert len(ids) < 0.6 * len(raw) and tok.decode(ids.tolist()) == text
    summary = stdout.strip().splitlines()
    assert len(summary) == 1 and f"train {n['train']:,} tokens" in summary[0] and dtype in summary[0]
    # The tokens source maps the two files and keeps the split.
    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": "tokens", "data.path": str(out), "model.context": 8})
    data = load_data(cfg.data, cfg.model)
    assert isinstance(data.train.tokens, np.memmap) and data.train.tokens.dtype == np.dtype(dtype)
    assert data.spec.vocab_size == meta["vocab_size"] and len(data.test) == n["val"] - 9
    x, y = data.test.batch(torch.tensor([0, 3]))
    assert x.dtype == torch.int64 and x[1].tolist() == ids[n["train"] + 3: n["train"] + 11].tolist()
    assert (x[:, 1:] == y[:, :-1]).all()


def test_bpe_can_encode_with_a_saved_tokenizer(tmp_path, capsys, corpus):
    first, second = tmp_path / "first", tmp_path / "second"
    assert _prepare(capsys, "--input", str(corpus), "--tokenizer", "bpe", "--vocab-size", "280",
                    "--output", str(first))[0] == 0
    rc, _, _ = _prepare(capsys, "--input", str(corpus / "b.txt"), "--tokenizer", "bpe", "--output", str(second),
                        "--tokenizer-file", str(first / "tokenizer.json"), "--val-fraction", "0.5")
    meta = json.loads((second / "meta.json").read_text())
    assert rc == 0 and meta["vocab_size"] == 280 and meta["tokens"]["val"] == int(0.5 * len(_read(second, meta)))
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()


def test_a_char_vocabulary_over_256_is_uint16_in_files_and_in_memory(tmp_path, capsys):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    assert _prepare(capsys, "--input", str(tmp_path / "cjk.txt"), "--tokenizer", "char",
                    "--output", str(tmp_path / "tok"))[0] == 0
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": "text", "data.path": str(tmp_path / "cjk.txt"),
                            "data.tokenizer": "char", "model.context": 8})
    data = load_data(cfg.data, cfg.model)
    assert data.train.tokens.dtype == np.uint16 and data.spec.vocab_size == 300


@pytest.mark.parametrize("args, message", [
    (["--input", "{tmp}/nope.txt", "--tokenizer", "byte"], "--input: '{tmp}/nope.txt' does not exist"),
    (["--input", "{corpus}", "--tokenizer", "bpe", "--vocab-size", "200"],
     "--vocab-size: byte-level BPE needs more than its 256 byte symbols (got 200)"),
    (["--input", "{corpus}", "--tokenizer", "byte", "--vocab-size", "300"], "--vocab-size: only for --tokenizer bpe"),
    (["--input", "{corpus}", "--tokenizer", "bpe", "--tokenizer-file", "{tmp}/bad.json"],
     "--tokenizer-file: '{tmp}/bad.json' is not a Hugging Face tokenizer: "),
    (["--input", "{corpus}", "--tokenizer", "char", "--val-fraction", "1.5"],
     "--val-fraction: must be between 0 and 1 (got 1.5)"),
])
def test_prepare_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, corpus, args, message):
    (tmp_path / "bad.json").write_text('{"model": "not a tokenizer"')
    fill = {"tmp": str(tmp_path), "corpus": str(corpus)}
    rc, stdout, stderr = _prepare(capsys, *[a.format(**fill) for a in args], "--output", str(tmp_path / "out" / "tok"))
    assert rc == 2 and not stdout
    assert stderr.startswith("lte-ray: error: " + message.format(**fill)) and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_prepare_does_not_overwrite_unless_forced_and_a_failed_write_leaves_nothing(tmp_path, capsys, corpus,
                                                                                    monkeypatch):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc, _, stderr = _prepare(capsys, "--input", str(corpus), "--tokenizer", "byte", "--output", str(out))
    assert rc == 2 and stderr == f"lte-ray: error: --output: '{out}' exists and is not empty (--force replaces it)\n"
    assert (out / "mine.txt").exists()
    assert _prepare(capsys, "--input", str(corpus), "--tokenizer", "byte", "--output", str(out), "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts", "tok"]  # no temporary folder left behind

    def disk_full(new, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokens, "_replace", disk_full)
    with pytest.raises(OSError):
        tokens.prepare([str(corpus / "a.txt")], str(tmp_path / "other"), "char")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts", "tok"]


def test_the_tokens_source_refuses_a_folder_that_does_not_match_its_meta(tmp_path, capsys, corpus):
    out = tmp_path / "tok"
    assert _prepare(capsys, "--input", str(corpus), "--tokenizer", "char", "--output", str(out))[0] == 0
    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": "tokens", "data.path": str(out), "model.context": 8})
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"val.bin' holds \d+ bytes, but meta.json says \d+ uint8 tokens"):
        load_data(cfg.data, cfg.model)
    (out / "val.bin").unlink()
    with pytest.raises(DataError, match="has no val.bin; make one with `lte-ray data prepare`"):
        load_data(cfg.data, cfg.model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is not a token folder \\(no meta.json\\)") as e:
        load_data(cfg.data.model_copy(update={"path": str(empty)}), cfg.model)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is not a folder"):
        build_config({}, {"model.name": "gpt_nano", "data.name": "tokens", "data.path": str(corpus / "a.txt")})


def _old_tokens(raw: bytes, tokenizer: str) -> torch.Tensor:
    """The int64 tokens of the earlier in-memory implementation."""
    if tokenizer == "byte":
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    text = raw.decode("utf-8", errors="replace")
    lookup = {c: i for i, c in enumerate(sorted(set(text)))}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long)


@pytest.mark.parametrize("name, tokenizer", [("text", "byte"), ("text", "char"), ("shakespeare", "byte"),
                                             ("shakespeare", "char")])
def test_text_sources_hold_uint8_and_give_the_same_windows_as_int64_tokens(corpus, name, tokenizer):
    files = shakespeare_files() if name == "shakespeare" else [str(corpus / "a.txt"), str(corpus / "b.txt")]
    context = 16
    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": name, "data.tokenizer": tokenizer,
                            "model.context": context, **({"data.path": str(corpus)} if name == "text" else {})})
    data = load_data(cfg.data, cfg.model)
    old = _old_tokens(b"\n".join(open(f, "rb").read() for f in files), tokenizer)
    n_test = max(context + 2, int(len(old) * cfg.data.test_fraction))
    for dataset, part in ((data.train, old[:-n_test]), (data.test, old[-n_test:])):
        assert dataset.tokens.dtype == np.uint8 and len(dataset) == len(part) - context - 1
        idx = torch.cat([torch.randint(len(dataset), (64,), generator=torch.Generator().manual_seed(0)),
                         dataset.eval_indices(), torch.tensor([0, len(dataset) - 1])])
        windows = part[idx[:, None] + torch.arange(context + 1)]
        x, y = dataset.batch(idx)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])


# ---- Ray: heads on one node map the token file -------------------------------------------------

def _head_probe():
    """An actor class that builds a real LTE head on data.name=tokens and reports what its
    process holds. Defined in a function so that Ray ships it by value (workers cannot import
    test modules)."""

    class HeadProbe:
        def train_one_round(self, cfg, head_id: int, broadcast, spec, token_file: str) -> dict:
            import numpy as np
            import torch

            from lte_ray.core.head import Head
            from lte_ray.datasets import DataBundle, TextDataset

            def rss_anon_kb() -> int:  # anonymous memory: heap, not file-backed pages
                with open("/proc/self/status") as f:
                    return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

            torch.set_num_threads(1)
            # A first head on a few in-memory tokens pays the one-off costs (lazy imports of torch
            # and bitsandbytes: ~130 MB), so that what is measured is the head on the token file.
            few = TextDataset(np.zeros(4 * cfg.model.context, dtype=np.uint16), cfg.model.context)
            Head(cfg, head_id, data=DataBundle(few, few, spec), device="cpu").train_round(0, broadcast)
            before = rss_anon_kb()
            head = Head(cfg, head_id, device="cpu")
            result = head.train_round(0, broadcast)
            with open("/proc/self/maps") as f:
                mapped = token_file in f.read()
            return {"growth_kb": rss_anon_kb() - before, "mapped": mapped, "loss": result.loss,
                    "tokens_type": type(head.data.train.tokens).__name__}

    return ray.remote(num_cpus=0.5)(HeadProbe)


def _token_folder(folder, n_train: int, vocab: int = 512) -> str:
    """A token folder the test writes itself: random uint16 tokens."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", 4096)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": vocab, "dtype": "uint16",
                                                  "tokens": {"train": n_train, "val": 4096}}))
    return str(folder)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
def test_four_heads_on_a_node_map_the_token_file_instead_of_copying_it(ray_cluster, tmp_path):
    from lte_ray.core.master import MasterWeights

    path = _token_folder(tmp_path / "tok", n_train=32 * 2**20)  # 64 MiB of uint16
    file_kb = os.path.getsize(os.path.join(path, "train.bin")) // 1024
    cfg = build_config({}, {"model.name": "gpt_nano", "model.depth": 1, "model.width": 32, "model.attn_heads": 2,
                            "model.context": 32, "data.name": "tokens", "data.path": path, "lte.rank": 4,
                            "lte.heads": 4, "lte.merge_every": 2, "train.batch_size": 8, "train.device": "cpu"})
    data = load_data(cfg.data, cfg.model)
    broadcast = ray.put(MasterWeights(cfg, data).broadcast(full=True))
    probe = _head_probe()
    probes = [probe.remote() for _ in range(4)]
    train_bin = os.path.join(path, "train.bin")
    try:
        reports = ray.get([p.train_one_round.remote(cfg, i, broadcast, data.spec, train_bin)
                           for i, p in enumerate(probes)])
    finally:
        for p in probes:
            ray.kill(p)
    growth = [r["growth_kb"] for r in reports]
    print(f"RssAnon growth per head (KiB): {growth}; train.bin {file_kb} KiB")
    assert max(growth) < file_kb / 4, f"a head grew by {max(growth)} KiB of anonymous memory; the file is {file_kb}"
    assert all(r["mapped"] and r["tokens_type"] == "memmap" and math.isfinite(r["loss"]) for r in reports)


# ---- end to end: Shakespeare BPE, memory-mapped, LTE on Ray -------------------------------------

@pytest.mark.slow
def test_gpt_on_shakespeare_bpe_tokens_beats_the_unigram_entropy(ray_cluster, tmp_path, capsys):
    from lte_ray.run import Run

    start = time.perf_counter()
    out = tmp_path / "shakespeare-bpe"
    rc, summary, _ = _prepare(capsys, "--corpus", "shakespeare", "--tokenizer", "bpe", "--vocab-size", "512",
                              "--output", str(out))
    meta = json.loads((out / "meta.json").read_text())
    assert rc == 0 and meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    prepared = time.perf_counter()
    cfg = build_config({}, {
        "model.name": "gpt_nano", "model.depth": 2, "model.width": 64, "model.attn_heads": 4, "model.context": 64,
        "data.name": "tokens", "data.path": str(out), "lte.heads": 4, "lte.rank": 8, "lte.alpha": 64,
        "lte.merge_every": 5, "train.rounds": 30, "train.lr": 3e-3, "train.batch_size": 16, "train.eval_every": 15,
        "train.device": "cpu", "ray.cpus_per_head": 0.5, "ray.start_grace_s": 600, "output": str(tmp_path / "run")})
    run = Run(cfg, backend="ray", tracking=False)
    s = run.finish(run.train())
    margin = meta["unigram_entropy_nats"] - s["eval_loss"]
    print(f"{summary.strip()}\nprepare {prepared - start:.1f}s, train {time.perf_counter() - prepared:.1f}s: "
          f"eval_loss {s['eval_loss']:.3f} vs unigram entropy {meta['unigram_entropy_nats']:.3f} "
          f"(margin {margin:.3f} nats)")
    assert margin >= 0.5


def test_the_bible_prepares_from_its_package(tmp_path, capsys):
    """`--corpus kjv`: the text is read out of the package's generated module, not its Python source."""
    out = tmp_path / "kjv-char"
    rc, summary, _ = _prepare(capsys, "--corpus", "kjv", "--tokenizer", "char", "--output", str(out))
    meta = json.loads((out / "meta.json").read_text())
    assert rc == 0 and meta["vocab_size"] == 68 and "".join(meta["vocab"][:3]) == "\n !"
    assert meta["sources"][0].endswith("plain_text_readers_bible.py") and str(out) in summary
    first = np.fromfile(out / "train.bin", dtype=meta["dtype"])[:16]
    assert "".join(meta["vocab"][t] for t in first) == "In the beginning"
