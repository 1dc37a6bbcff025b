"""The bundled demo model's command line: ``python -m sega.demo train|eval|sweep``.

    python -m sega.demo train --out assets/shapes-model      # the recipe in the model card
    python -m sega.demo sweep --model assets/shapes-model    # presets per edit kind, on tuning seeds
    python -m sega.demo eval  --model assets/shapes-model    # prompt accuracy, edit success, IoU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .shapes import DEFAULT_MODEL_DIR
from .train import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sega.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the demo model from scratch")
    p_train.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    p_train.add_argument("--vae-steps", type=int, default=600)
    p_train.add_argument("--unet-steps", type=int, default=2400)
    p_train.add_argument("--batch-size", type=int, default=64)
    p_train.add_argument("--lr", type=float, default=1e-3)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--save-every", type=int, default=0)
    p_train.add_argument("--init-from", default=None, help="continue from a saved model (use with --vae-steps 0)")
    p_eval = sub.add_parser("eval", help="prompt accuracy, SEGA edit success and composition IoU")
    p_eval.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_eval.add_argument("--seeds", type=int, default=24, help="seeds per edit kind")
    p_eval.add_argument("--first-seed", type=int, default=1000, help="evaluation seeds start here (tuning used 0..999)")
    p_sweep = sub.add_parser("sweep", help="choose (scale, threshold, warmup) per edit kind on tuning seeds")
    p_sweep.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_sweep.add_argument("--seeds", type=int, default=8, help="tuning seeds per setting (from 0)")
    p_sweep.add_argument("--kinds", default="color,background,shape,size", help="comma-separated edit kinds")
    p_sweep.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        from .evaluate import load, sweep

        result = sweep(load(args.model), list(range(args.seeds)), kinds=args.kinds.split(","))
        print("best:", json.dumps(result["best"]))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "train":
        train(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, save_every=args.save_every, init_from=args.init_from)
    else:
        from .evaluate import run_eval

        run_eval(args.model, n_seeds=args.seeds, first_seed=args.first_seed)


if __name__ == "__main__":
    main()
