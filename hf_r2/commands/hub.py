"""`hf-r2 push` (a saved model folder and its model card to a Hub repo) and `hf-r2 download` (a Hub repo to the cache
or a folder), over [`hf_r2.hub`]."""

from __future__ import annotations

import argparse
import sys

__all__ = ["push_command_parser", "push_command", "download_command_parser", "download_command"]


def push_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `push` sub-command: upload a saved model folder (with its model card) to the Hub."""
    description = (
        "Write the model card into a saved model folder (from `hf-r2 train` or `save_model`) and upload the folder "
        "to a Hub repo; timm and transformers load it without hf-r2. Hidden files and folders (at every depth), "
        "symbolic links, training_args.bin, checkpoint-*/ and runs/ stay local (the first three are named); a file "
        "holding the push's token is refused. A failed upload leaves the folder whole: run the same command again."
    )
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 push", description=description)
    else:
        parser = subparsers.add_parser("push", description=description, help="Upload a saved model folder to the Hub.")
    parser.add_argument("model_dir", help="The saved model folder.")
    parser.add_argument("repo_id", help="The Hub repo, namespace/name (created if missing).")
    parser.add_argument("--dataset", "--datasets", dest="datasets", action="append", default=None,
                        help="Hub id of the training / evaluation data, listed on the card (repeatable). The "
                        "card's model-index puts a number on it only if the folder records that number was measured "
                        "on that whole dataset (or records no data); numbers from a local copy or subset say so.")
    parser.add_argument("--base-model", "--base_model", default=None, help="The checkpoint it was fine-tuned from.")
    parser.add_argument("--license", default=None,
                        help="License id of the weights, for the card (default: the one timm's pretrained_cfg in "
                        "config.json names, else the card says none was given).")
    parser.add_argument("--commit-message", "--commit_message", default="Upload model trained with hf-r2",
                        help="The commit message.")
    parser.add_argument("--revision", default=None, help="The branch to commit to (default: main).")
    parser.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
    parser.add_argument("--create-pr", "--create_pr", action="store_true", help="Open a pull request instead.")
    parser.add_argument("--no-exist-ok", "--no_exist_ok", dest="exist_ok", action="store_false",
                        help="Fail if the repo already exists.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`'s).")
    parser.add_argument("--keep-readme", "--keep_readme", dest="write_card", action="store_false",
                        help="Keep the folder's own README.md: do not write the hf-r2 model card into it.")
    parser.set_defaults(func=push_command)
    return parser


def push_command(args: argparse.Namespace) -> int:
    from ..hub import HubPushError, push_folder

    try:
        url = push_folder(
            args.model_dir, args.repo_id, commit_message=args.commit_message, token=args.token,
            revision=args.revision, private=args.private, create_pr=args.create_pr, exist_ok=args.exist_ok,
            datasets=args.datasets, base_model=args.base_model, license=args.license, write_card=args.write_card,
        )
    except (HubPushError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hf-r2 push: error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0


def download_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `download` sub-command: fetch a Hub repo (into the cache, or a folder) and print its path."""
    description = "Download a model repo from the Hub (into the cache, or --local-dir) and print the folder's path."
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 download", description=description)
    else:
        parser = subparsers.add_parser("download", description=description, help=description)
    parser.add_argument("repo_id", help="The Hub repo, namespace/name.")
    parser.add_argument("--local-dir", "--local_dir", default=None, help="Download into this folder.")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit (default: main).")
    parser.add_argument("--token", default=None, help="Hub token, for private repos.")
    parser.set_defaults(func=download_command)
    return parser


def download_command(args: argparse.Namespace) -> int:
    from ..hub import download

    try:
        path = download(args.repo_id, local_dir=args.local_dir, revision=args.revision, token=args.token)
    except (ValueError, OSError) as err:  # invalid id; not found, offline without a cached copy, network errors
        print(f"hf-r2 download: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0
