"""Export a trained model directory for shipping: fp16 safetensors + configs, no run state.

    python -m igpt_cli.export RUN_DIR OUT_DIR [--overwrite] [--dtype float16|bfloat16|float32]

The export is built in `.OUT_DIR.tmp` next to OUT_DIR and renamed into place only when
complete, so OUT_DIR is never half-written; OUT_DIR is locked for the export
(`outputs.output_lock`), and so is RUN_DIR, so a training run cannot write it while it is
read. An existing, non-empty OUT_DIR is replaced only with `overwrite=True`. Bad input (a
missing or half-written run directory, an output that is a file or the run itself, a
full disk) is one `InputError` line naming the path; the command prints it as
`error: …` and exits 2.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import InputError, ParameterError
from .model import load_pretrained, save_pretrained
from .outputs import OutputError, check_distinct, check_output_path, output_lock, temp_path_for
from .train.state import write_errors

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COPIED = ("preprocessor_config.json", "train_meta.json")


def _lock_if_writable(d: Path):
    """The run directory's lock, where one can be created (a read-only run is not being trained)."""
    return output_lock(d) if os.access(d.parent if str(d.parent) else ".", os.W_OK) else contextlib.nullcontext()


def export_model(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16, *,
                 overwrite: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES.values():
        raise ParameterError("dtype", str(dtype), f"expected one of torch.{', torch.'.join(DTYPES)}")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: model directory not found")
    check_output_path(out, overwrite, directory=True)
    if out.exists() and out.resolve() == run_dir.resolve():
        raise ParameterError("out_dir", str(out), "is the run directory itself; export to another directory")
    check_distinct({"out_dir": out}, {"run_dir": run_dir})
    if os.path.realpath(run_dir).startswith(os.path.realpath(out) + os.sep):  # replacing out would delete the run
        raise ParameterError("out_dir", str(out), f"holds the run directory {run_dir}; export to another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: exists and is not empty (pass overwrite=True to replace it)")
    tmp = temp_path_for(out)
    with _lock_if_writable(run_dir), output_lock(out):
        model = load_pretrained(run_dir)  # one line for a missing, half-written or foreign directory
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with write_errors(out, f"exporting {run_dir}"):
                tmp.mkdir()
                save_pretrained(model, tmp, dtype=dtype)
                for name in COPIED:
                    if (run_dir / name).is_file():
                        shutil.copyfile(run_dir / name, tmp / name)
                _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m igpt_cli.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="model directory written by igpt train")
    p.add_argument("out_dir", help="directory to write (created; replaced only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT_DIR")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="weights dtype (default float16)")
    a = p.parse_args(argv)
    try:
        out = export_model(a.run_dir, a.out_dir, DTYPES[a.dtype], overwrite=a.overwrite)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
