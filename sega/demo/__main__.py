"""The bundled demo model's command line: ``python -m sega.demo train|eval|sweep``.

    python -m sega.demo train --out assets/shapes-model      # the recipe in the model card
    python -m sega.demo sweep --model assets/shapes-model    # presets per edit kind, on tuning seeds
    python -m sega.demo eval  --model assets/shapes-model    # prompt accuracy, edit success, IoU
    python -m sega.demo fit-previews                         # the live previews' latent-to-RGB map
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .shapes import DEFAULT_MODEL_DIR
from .train import train


def fit_previews(model: str, images: int) -> None:
    """Print the least-squares latent-to-RGB map of ``model``'s VAE (for sega/demo/previews.py) and its error."""
    from diffusers import AutoencoderKL

    from .previews import fit_latent_rgb, map_error

    vae = AutoencoderKL.from_pretrained(Path(model) / "vae").eval()
    factors, bias = fit_latent_rgb(vae, images)
    print("DEMO_LATENT_RGB_FACTORS =", tuple(tuple(round(v, 4) for v in row) for row in factors.tolist()))
    print("DEMO_LATENT_RGB_BIAS =", tuple(round(v, 4) for v in bias.tolist()))
    rms, spread = map_error(vae, factors, bias)
    print(f"held-out RMS error {rms:.3f} (colours' spread {spread:.3f}; [-1, 1] units)")


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
    p_train.add_argument("--decoder-steps", type=int, default=0, help="fine-tune the VAE decoder alone first")
    p_train.add_argument("--caption-mix", default="partial", choices=["partial", "edit"])
    p_train.add_argument("--warmup-steps", type=int, default=100)
    p_train.add_argument("--lr-floor", type=float, default=0.1, help="the cosine ends at this share of --lr")
    p_train.add_argument("--work-dir", default=None,
                         help="resumable state outside git; a restarted command continues from its last checkpoint")
    p_train.add_argument("--checkpoint-every", type=int, default=50)
    p_train.add_argument("--log-every", type=int, default=50)
    p_train.add_argument("--max-seconds", type=float, default=None, help="time budget of the run, resumes included")
    p_train.add_argument("--max-cpu-seconds", type=float, default=None,
                         help="budget in CPU seconds of the process (2 busy cores: 120 per minute), resumes included")
    p_train.add_argument("--prior-seconds", type=float, default=0.0,
                         help="training time already spent on --init-from, for training.json")
    p_eval = sub.add_parser("eval", help="prompt accuracy, SEGA edit success and composition IoU")
    p_eval.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_eval.add_argument("--seeds", type=int, default=48, help="seeds per edit kind (prompt accuracy: 4x)")
    p_eval.add_argument("--json", default=None, help="also write the report here")
    p_eval.add_argument("--kinds", default=None, help="comma-separated edit kinds (default all; '' for none)")
    p_eval.add_argument("--prompt-seeds", type=int, default=None, help="prompt accuracy seeds (default 4x --seeds)")
    p_eval.add_argument("--first-seed", type=int, default=1000, help="evaluation seeds start here (tuning used 0..999)")
    p_eval.add_argument("--mask", default="none", choices=["none", "cross-attention", "intersect"],
                        help="implicit masks (LEDITS++) on every edit")
    p_eval.add_argument("--presets", default=None,
                        help="a JSON file of presets to use instead of the built-in ones (the mask mode's)")
    p_eval.add_argument("--real", action="store_true",
                        help="edit uploads drawn by the renderer (inversion) instead of generated images")
    p_sweep = sub.add_parser("sweep", help="success per (scale, threshold, warmup) and edit kind, on tuning seeds")
    p_sweep.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_sweep.add_argument("--seeds", type=int, default=12, help="tuning seeds per setting")
    p_sweep.add_argument("--first-seed", type=int, default=0, help="tuning seeds are 0-899")
    p_sweep.add_argument("--kinds", default="color,background,shape,size,removal,three",
                         help="comma-separated edit kinds; three after color and background combines their best")
    p_sweep.add_argument("--scales", default="10,15,20")
    p_sweep.add_argument("--thresholds", default="0.5,0.8")
    p_sweep.add_argument("--warmups", default="2,5,8")
    p_sweep.add_argument("--json", default=None, help="also write the table here")
    p_sweep.add_argument("--mask", default="none", choices=["none", "cross-attention", "intersect"],
                         help="implicit masks (LEDITS++) on every edit")
    p_sweep.add_argument("--real", action="store_true",
                         help="presets for uploads (inversion): colour, background and shape on tuning images")
    p_fit = sub.add_parser("fit-previews", help="fit the live previews' latent-to-RGB map to the model's VAE")
    p_fit.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_fit.add_argument("--images", type=int, default=600)
    args = parser.parse_args(argv)
    if args.command == "fit-previews":
        fit_previews(args.model, args.images)
    elif args.command in ("eval", "sweep") and args.real:
        real(args)
    elif args.command == "sweep":
        from .evaluate import choose, grid, load, sweep

        if args.first_seed + args.seeds > 900:
            parser.error("--first-seed + --seeds must stay below 900: seeds from 900 on are for tests and eval")
        numbers = lambda text, kind: [kind(x) for x in text.split(",")]  # noqa: E731
        g = grid(numbers(args.scales, float), numbers(args.thresholds, float), numbers(args.warmups, int))
        kinds = args.kinds.split(",")
        table = sweep(load(args.model), list(range(args.first_seed, args.first_seed + args.seeds)), kinds=kinds,
                      grids={**{k: g for k in kinds if k != "three"}, "background": g}, mask=args.mask)
        for kind, rows in table.items():
            print(f"best {kind}: {json.dumps(choose(kind, rows))}")
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    elif args.command == "train":
        train(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, save_every=args.save_every, init_from=args.init_from,
              decoder_steps=args.decoder_steps, caption_mix=args.caption_mix, warmup_steps=args.warmup_steps,
              lr_floor=args.lr_floor, work_dir=args.work_dir, checkpoint_every=args.checkpoint_every,
              max_seconds=args.max_seconds, max_cpu_seconds=args.max_cpu_seconds,
              prior_seconds=args.prior_seconds, log_every=args.log_every)
    else:
        from .evaluate import EDIT_KINDS, run_eval

        kinds = list(EDIT_KINDS) if args.kinds is None else [k for k in args.kinds.split(",") if k]
        if unknown := set(kinds) - set(EDIT_KINDS):
            parser.error(f"--kinds must be among {', '.join(EDIT_KINDS)}; got {', '.join(sorted(unknown))}")
        presets = json.loads(Path(args.presets).read_text()) if args.presets else None
        run_eval(args.model, n_seeds=args.seeds, first_seed=args.first_seed, out_json=args.json, kinds=kinds,
                 prompt_seeds=args.prompt_seeds, mask=args.mask, presets=presets)


def real(args) -> None:
    """``eval --real`` / ``sweep --real``: editing uploads drawn by the renderer, through the inversion."""
    from ..caching import LRUCache
    from .editing import DEMO_EDIT_DEFAULTS, REAL_KINDS, evaluate_real, sweep_real
    from .evaluate import load
    from .presets import DEMO_PRESET_TABLES

    pipe = load(args.model)
    # Every kind and setting edits the same uploads: keep each one's inversion for the run.
    pipe.inversion_cache = LRUCache(1024)
    if args.command == "sweep":
        numbers = lambda text, kind: [kind(x) for x in text.split(",")]  # noqa: E731
        grid = {"scale": numbers(args.scales, float), "warmup": numbers(args.warmups, int),
                "threshold": numbers(args.thresholds, float)}
        kinds = tuple(k for k in args.kinds.split(",") if k in REAL_KINDS[1:]) or REAL_KINDS[1:]
        result = sweep_real(pipe, list(range(args.first_seed, args.first_seed + args.seeds)), grid,
                            {**DEMO_EDIT_DEFAULTS, "mask": args.mask}, kinds=kinds)
        print("best:", json.dumps(result["best"]))
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        presets = (json.loads(Path(args.presets).read_text()) if args.presets
                   else DEMO_PRESET_TABLES.table("edit", args.mask))
        kinds = REAL_KINDS if args.kinds is None else tuple(k for k in args.kinds.split(",") if k in REAL_KINDS)
        result = evaluate_real(pipe, seeds, presets, {**DEMO_EDIT_DEFAULTS, "mask": args.mask}, kinds=kinds)
        for kind, r in result.items():
            print(f"{kind:15s}: success {r['success']:.1%}, other attributes kept {r['kept']:.1%}, "
                  f"mask IoU with the input {r['iou']:.3f} ({r['n']} uploads)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
