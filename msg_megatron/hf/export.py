"""msg-export-hf --load CKPT --out DIR [--dtype bf16|fp16|fp32]: a checkpoint as a `transformers` model.

Reads a checkpoint of any TP/PP layout one layer at a time (the canonical unit order restored from
the saved unit ids), writes sharded safetensors, config.json, generation_config.json and the
tokenizer (tokenizer.json for AutoTokenizer + the sentencepiece model). The folder loads with
`AutoModelForCausalLM.from_pretrained(DIR)` (a BERT, model.family=bert: `AutoModelForMaskedLM`, with
its WordPiece tokenizer.json) and `AutoTokenizer.from_pretrained(DIR)`, no custom code. A checkpoint whose masks are still ramping is refused: exporting it would change the function.
The folder is written under DIR.tmp-* and renamed when complete, so a killed export leaves no
folder that looks finished.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional

import torch

from ..checkpoint.dist import META
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.run_lock import LOCK
from ..checkpoint.verify import verify_checksums
from ..cli import run_cli
from ..data.tokenizer import find_tokenizer
from ..model.gpt import padded_vocab_size
from ..model.params import outer_rows
from ..permissions import honour_umask
from .layout import BERT, architecture, dims, hf_config, to_hf
from .tokenizer import special_ids, write_tokenizer

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16")}


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size `{text}` must be bytes or a number with KB/MB/GB (e.g. 5GB)")


class ShardWriter:
    """Collects tensors and writes a safetensors file whenever `limit` bytes are reached."""

    def __init__(self, out_dir: str, limit: int):
        self.out_dir, self.limit = out_dir, limit
        self.pending, self.pending_bytes, self.files, self.index, self.total = {}, 0, [], {}, 0

    def add(self, tensors: dict) -> None:
        """Add one group (a layer): it goes to the next file if it would take this one over the limit."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        for name, t in tensors.items():
            self.pending[name] = t
            self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        honour_umask(os.path.join(self.out_dir, name))  # (safetensors writes 0600)
        self.files.append(name)
        for k in self.pending:
            self.index[k] = name
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list:
        """Rename to HF's model-0000i-of-0000N names (one file: model.safetensors) and write the index."""
        self.flush()
        n = len(self.files)
        final = {f: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, f in enumerate(self.files)}
        for old, new in final.items():
            os.rename(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: final[v] for k, v in sorted(self.index.items())}}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=1)
        return sorted(final.values())


def not_an_export(out: str, source: str) -> Optional[str]:
    """Why --force may not delete `out`, or None when it holds an earlier export and nothing else of
    value: it must not be (or hold, or lie inside) the checkpoint being read, a checkpoint or save
    directory, a live run's lock, or anything but an export's files."""
    real_out, real_src = os.path.realpath(out), os.path.realpath(source)
    if real_src == real_out or real_src.startswith(real_out + os.sep):
        return "holds the checkpoint being exported (--load)"
    if real_out.startswith(real_src + os.sep):
        return "lies inside the checkpoint being exported (--load)"
    if not os.path.isdir(out):
        return "is a file, not an earlier export"
    names = os.listdir(out)
    if LOCK in names:
        return f"holds a run lock ({LOCK}): it is a save directory"
    if META in names or "latest" in names or any(n.startswith("step_") for n in names):
        return "holds checkpoints (msg_meta.json, step_* or latest)"
    try:
        with open(os.path.join(out, "config.json")) as f:
            exported = "msg_megatron" in json.load(f)
    except (OSError, ValueError):
        exported = False
    if not exported:
        return "is not an earlier export (no config.json written by msg-export-hf)"
    return None


def export(load: str, out: str, dtype: str = "fp32", max_shard_size: int = 5 << 30, force: bool = False,
           log=print, verify: bool = True) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype `{dtype}` must be one of {', '.join(DTYPES)}")
    reader = CheckpointReader(load)
    if verify:  # (before anything is written: a damaged checkpoint would export as a good-looking model)
        verify_checksums(reader.path)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not force:
            raise ValueError(f"--out `{out}` exists and is not empty; choose a new folder or pass --force to replace "
                             "an earlier export there")
        why = not_an_export(out, reader.path)
        if why:
            raise ValueError(f"--out `{out}` {why}; --force replaces only an earlier export (a folder of "
                             "msg-export-hf's config.json and weights). Choose a new folder")
    mcfg, shape = reader.mcfg, reader.shape
    arch = architecture(mcfg, shape)
    reader.refuse_mid_ramp("exporting")
    torch_dtype, dtype_name = DTYPES[dtype]
    tmp = f"{os.path.normpath(out)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        writer = ShardWriter(tmp, max_shard_size)
        cast = lambda d: {k: v.to(torch_dtype).contiguous() for k, v in d.items()}  # noqa: E731
        d = dims(mcfg, shape)
        outer_names = [r.name for r in outer_rows() if not r.is_buffer and reader.has(r.name)]
        writer.add(cast(to_hf(arch, reader.load(outer_names), d)))
        for i in range(shape.layers):
            layer = {f"layers.{i}.{k}": v for k, v in reader.layer(i).items()}
            writer.add(cast(to_hf(arch, layer, d, layer=i)))
        files = writer.finish()
        tok = find_tokenizer(reader.path)
        family = mcfg.family
        ids = special_ids(tok, family) if tok else {"bos": 1, "eos": 2, "pad": 0}
        config = hf_config(arch, mcfg, shape, padded_vocab_size(mcfg), dtype_name, ids["bos"], ids["eos"], ids["pad"])
        # how to get back (msg-import-hf reads it: the exact model config, the vocabulary before padding)
        config["msg_megatron"] = {"model": reader.meta["config"]["model"], "shape": list(shape.as_tuple()),
                                  "step": reader.step, "version": reader.meta.get("version")}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if arch != BERT:  # (an encoder does not generate)
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}, f, indent=1)
        if tok:
            write_tokenizer(tok, tmp, mcfg.seq_length, family)
        else:
            log(f"msg-export-hf: warning: `{reader.path}` holds no tokenizer (tokenizer.model or tokenizer.json); "
                "the export has none")
        if os.path.exists(out):
            shutil.rmtree(out)
        honour_umask(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "architecture": config["architectures"][0], "shape": list(shape.as_tuple()),
            "step": reader.step, "dtype": dtype_name, "files": files, "bytes": writer.total,
            "tokenizer": bool(tok)}


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="msg-export-hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint step directory or save directory (its `latest`)")
    ap.add_argument("--out", required=True, help="output folder for the transformers model")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights' dtype (default fp32)")
    ap.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint's files")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = export(args.load, args.out, args.dtype, parse_size(args.max_shard_size), args.force,
                 verify=not args.no_verify)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"exported {res['architecture']} {tuple(res['shape'])} (step {res['step']}, {res['dtype']}) to "
              f"{res['out']}: {len(res['files'])} file(s), {res['bytes'] / 1e6:.1f} MB"
              + ("" if res["tokenizer"] else ", no tokenizer"))
    return 0


def main(argv=None) -> None:
    sys.exit(run_cli("msg-export-hf", _main, argv))


if __name__ == "__main__":
    main()
