"""`pt2serve constants`: list, load and swap a served model's constants."""

from __future__ import annotations

import argparse

from pt2serve.service.client import Pt2ServeClient
from pt2serve.service.pb import pt2serve_pb2 as pb


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
