"""`python -m patchflow info ENDPOINT`: what a daemon serves and its limits."""

from __future__ import annotations

import argparse
import json
import sys

from . import Client, Error


def _info(args: argparse.Namespace) -> int:
    client = Client(
        args.endpoint,
        token_file=args.token_file,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_domain=args.tls_domain,
        max_attempts=args.attempts,
    )
    datasets = client.list_datasets()
    limits = client.limits()[0]
    described = {d["name"]: client.describe(d["name"]) for d in datasets} if args.describe else {}
    if args.json:
        out = {"endpoint": args.endpoint, "datasets": datasets, "limits": limits}
        if described:
            out["descriptions"] = described
        json.dump(out, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    print(f"{args.endpoint}: {len(datasets)} dataset(s)")
    for d in datasets:
        line = f"  {d['name']}: {d['num_cases']} cases, {d['num_channels']} channel(s)"
        if d["set_aside"]:
            line += f", {len(d['set_aside'])} set aside"
        print(line)
        for c in d["set_aside"]:
            print(f"    set aside: {c['id']}: {c['reason']}")
        if d["name"] in described:
            desc = described[d["name"]]
            names = desc["label_names"]
            classes = ", ".join(
                f"{c['value']} {names.get(c['value'], c['name'] or '')}".strip() for c in desc["classes"]
            )
            print(f"    classes: {classes}")
            print(f"    ignore label: {desc['ignore_label']}")
    print("limits:")
    for key, value in limits.items():
        print(f"  {key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list a daemon's datasets and limits")
    info.add_argument("endpoint", help="unix:/path, http://host:port, https://host:port or host:port")
    info.add_argument("--token-file", help="file holding the daemon's bearer token")
    info.add_argument("--tls-ca", help="CA certificate (PEM) to trust")
    info.add_argument("--tls-cert", help="client certificate (PEM)")
    info.add_argument("--tls-key", help="client key (PEM)")
    info.add_argument("--tls-domain", help="name on the daemon's certificate")
    info.add_argument("--describe", action="store_true", help="also describe every dataset")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--attempts", type=int, default=3, help="connection attempts [3]")
    args = parser.parse_args(argv)
    try:
        return _info(args)
    except Error as e:
        print(f"patchflow: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
