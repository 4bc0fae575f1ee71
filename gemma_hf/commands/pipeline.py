"""`gemma-hf pipeline`: run a post-training pipeline (stages of method recipes) from a YAML file."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run a post-training pipeline: stages that are ordinary method recipes (sft, reward, distill, rlhf,
warp, eval), each stage's output feeding the next ({from: STAGE}). Every stage is validated before
the first one starts. The pipeline directory keeps each stage's run directory (stages/NAME), its
log (logs/NAME.log) and manifest.json (a stage's own output_dir is not used: an output_dir in a
stage's overrides or inline recipe is refused, a recipe file's is replaced). Running the same command
again skips finished stages, resumes an interrupted one, re-runs a stage whose recipe changed (and
every stage after it) and a stage whose output directory was lost (and every stage reading from it).
When all stages have finished, the final stage's model is published at the directory's root with
a card covering the whole pipeline.

  gemma-hf pipeline --config recipes/gemma3-270m/post-training.yaml
  gemma-hf pipeline --config P.yaml --check        # validate every stage, run nothing
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run a post-training pipeline (stages of recipes)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="PIPELINE.yaml", help="the pipeline file")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                        help="override the pipeline's output_dir")
    parser.add_argument("--check", action="store_true", help="validate every stage and exit")
    parser.set_defaults(func=pipeline_command)


def pipeline_command(args: argparse.Namespace) -> int:
    from gemma_hf.recipes.pipeline import check_pipeline, read_pipeline, run_pipeline

    overrides = ["--output_dir", args.output_dir] if args.output_dir else []
    pipeline = read_pipeline(args.config, overrides)
    if args.check:
        recipes = check_pipeline(pipeline)
        print(f"ok: {args.config}: {len(recipes)} stages valid ({', '.join(f'{s.name} ({s.method})' for s in pipeline.stages)}), "
              f"output_dir {pipeline.output_dir}")
        for note in pipeline.notes:
            print(f"note: {note}")
        return 0
    manifest = run_pipeline(pipeline)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`: the main process reports
        return 0
    print(f"\npipeline finished: {pipeline.output_dir}")
    for name, entry in manifest["stages"].items():
        print(f"  {name:<10} {entry['method']:<7} {entry.get('seconds', 0):>7.0f} s  {entry['output']}")
    return 0
