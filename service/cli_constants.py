"""`pt2serve constants`: list, load and swap a served model's constants, on one server
or across a fleet (`rollout`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from pt2serve.service.client import Pt2ServeClient
from pt2serve.service.pb import pt2serve_pb2 as pb


def add_constants_parser(sub: Any, connection_flags: Callable[..., None]) -> argparse.ArgumentParser:
    """The `constants` command and its actions; `connection_flags(parser, several=)`
    adds the target and TLS flags."""
    constants: argparse.ArgumentParser = sub.add_parser(
        "constants", help="list, load and swap a served model's constants (weights)"
    )
    constants_sub = constants.add_subparsers(dest="action", required=True)
    for action, help_text in (
        ("list", "FQN, internal name, dtype and shape of each constant"),
        ("load", "load new weights from a .safetensors or torch.save state-dict file"),
        ("swap", "serve the constants staged with --inactive"),
    ):
        p = constants_sub.add_parser(action, help=help_text)
        connection_flags(p)
        p.add_argument("--model", required=True)
        if action == "load":
            p.add_argument("--file", required=True, help="path on the server, under its model root")
            p.add_argument(
                "--upload", action="store_true", help="read --file here and stream it to the server instead"
            )
            p.add_argument(
                "--swap", action="store_true", help="stage, then switch atomically between batches"
            )
            p.add_argument(
                "--inactive", action="store_true", help="stage only; serve later with `constants swap`"
            )
            p.add_argument("--full", action="store_true", help="require every constant of the model")
            p.add_argument("--label", default="", help="a name for these weights, reported with the version")
    rollout = constants_sub.add_parser(
        "rollout",
        help="one weight set on every replica: stage everywhere, then swap everywhere",
        description="Stage the weights on every replica (use_inactive); if any refuses, discard "
        "them everywhere and keep serving the old set. Then swap every replica, retrying a failed "
        "swap, and report the version and label each replica serves.",
    )
    connection_flags(rollout, several=True)
    rollout.add_argument("--model", required=True)
    rollout.add_argument("--file", help="path on each replica, under its model root")
    rollout.add_argument(
        "--upload", action="store_true", help="read --file here and upload it to each replica"
    )
    rollout.add_argument("--label", default="", help="a name for these weights, reported per replica")
    rollout.add_argument("--check", action="store_true", help="only report the label each replica serves")
    return constants


def constants_command(client: Pt2ServeClient, args: argparse.Namespace) -> int:
    skipped: list[str] = []
    if args.action == "list":
        listed = client.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name=args.model))
        for c in listed.constants:
            print(f"{c.fqn} ({c.internal_name}): {pb.DType.Name(c.dtype).lower()}{list(c.shape)}")
        return 0
    if args.action == "swap":
        response = client.swap_constants(args.model)
    elif args.upload:
        from pt2serve.loader.weights import open_weights

        with open_weights(args.file) as weights:
            tensors = {key: weights.get(key) for key in weights.keys()}
        known = {
            c.fqn for c in client.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name=args.model)).constants
        }
        skipped = sorted(set(tensors) - known)
        response = client.load_constants(
            args.model,
            {k: v for k, v in tensors.items() if k in known},
            use_inactive=args.inactive or args.swap,
            check_full_update=args.full,
            label=args.label,
        )
        if args.swap:
            updated = response.updated
            response = client.swap_constants(args.model)
            response.updated = updated
    else:
        response = client.load_constants_from_file(
            args.model,
            args.file,
            swap=args.swap,
            use_inactive=args.inactive,
            check_full_update=args.full,
            label=args.label,
        )
    label = f" ({response.constants_label})" if response.constants_label else ""
    version = f"{response.constants_version}{label}"
    print(f"model {args.model}: {response.updated} constant(s) updated; serving version {version}")
    ignored = sorted({*response.ignored, *skipped})
    if ignored:
        print(f"ignored (not constants of the model): {', '.join(ignored)}")
    return 0


def rollout_command(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from pt2serve.service import rollout

    if args.check:
        states = rollout.check(args.targets, args.model, **options)
        _print_states(args.model, states)
        return 0 if all(not s.error for s in states) else 1
    if not args.file:
        raise SystemExit("constants rollout: --file is required (or --check)")
    weights: dict[str, Any] = {}
    if args.upload:
        from pt2serve.loader.weights import open_weights

        with open_weights(args.file) as opened:
            weights = {key: opened.get(key) for key in opened.keys()}
    report = rollout.rollout(
        args.targets,
        args.model,
        label=args.label,
        file=None if args.upload else args.file,
        constants=weights if args.upload else None,
        **options,
    )
    if report.phase == "staged" and not report.ok:
        print(f"rollout of {args.label or 'the weights'} refused; staged weights discarded everywhere:")
    elif not report.ok:
        print(f"rollout incomplete: {len(report.errors)} replica(s) did not switch:")
    for address, error in sorted(report.errors.items()):
        print(f"  {address}: {error}")
    _print_states(args.model, report.replicas)
    return 0 if report.ok else 1


def _print_states(model: str, states: Sequence[Any]) -> None:
    print(f"model {model}:")
    for state in states:
        if state.error:
            print(f"  {state.address}: {state.error}")
        else:
            label = f" ({state.label})" if state.label else ""
            print(f"  {state.address}: version {state.version}{label}")
