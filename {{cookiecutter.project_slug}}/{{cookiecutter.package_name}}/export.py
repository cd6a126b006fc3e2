"""Share the weights: a checkpoint's model as one safetensors file, with the run's config beside it.

    python -m {{ cookiecutter.package_name }}.export OUT_DIR/best.pt model.safetensors

Reads ``best.pt``, ``last.pt`` or ``parallel=fsdp``'s sharded ``last``, and writes the model's
weights alone (no optimizer, no run state) to OUT and the config to OUT with ``.yaml``: what
the Hugging Face Hub and inference servers load, with no code from the file (safetensors holds
tensors only). Needs ``pip install safetensors`` (the project's ``export`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .essentials.checkpoint import CheckpointError, load_checkpoint, load_weights
from .essentials.config import ConfigError, config_from_dict, dump_yaml
from .machinery.files import atomic_write
from .model import build_model


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's weights to ``out`` and its config to ``out`` with ``.yaml``; return that path.
    Raises CheckpointError (unreadable, or not this model) or ConfigError (its config)."""
    try:
        from safetensors.torch import save_model
    except ImportError:
        raise CheckpointError("export writes safetensors: pip install safetensors (or -e '.[export]')") from None
    saved = load_checkpoint(checkpoint)
    cfg = config_from_dict(saved["config"], source=str(checkpoint))
    model = build_model(cfg)
    load_weights(model, saved, checkpoint)  # a file or a sharded folder, checked against the model it names
    out, config_path = Path(out), Path(out).with_suffix(".yaml")
    try:
        # save_model, not save_file: tied weights (an embedding shared with the output layer) are stored once.
        atomic_write(out, lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))
        atomic_write(config_path, lambda tmp: Path(tmp).write_text(dump_yaml(cfg)))
    except OSError as e:
        raise CheckpointError(f"could not write {e.filename or out}: {e.strerror}") from None
    return config_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m {{ cookiecutter.package_name }}.export",
        description="Write a checkpoint's model weights as safetensors, and its config as YAML beside them.",
    )
    parser.add_argument("checkpoint", help="best.pt, last.pt, or parallel=fsdp's sharded last")
    parser.add_argument("out", help="the safetensors file to write, e.g. model.safetensors")
    args = parser.parse_args(argv)
    try:
        config_path = export(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} and {config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
