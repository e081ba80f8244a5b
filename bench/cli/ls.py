"""`bench ls [methods|metrics|datasets|models]`: what is registered, without importing it."""

from __future__ import annotations

KINDS = ("methods", "metrics", "datasets", "models")


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser("ls", help="list registered methods, metrics, data sets and models",
                       description="List registered entries with a one-line description (and the paper, for methods).")
    p.add_argument("kind", nargs="?", choices=KINDS, help="what to list (default: everything)")
    p.add_argument("--cards", action="store_true", help="methods: show each adapter's card (imports the adapters)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bench import catalog

    registries = {"methods": catalog.METHODS, "metrics": catalog.METRICS,
                  "datasets": catalog.DATASETS, "models": catalog.MODELS}
    for kind in ([args.kind] if args.kind else KINDS):
        registry = registries[kind]
        entries = list(registry.entries())
        print(f"{kind}:")
        width = max(len(e.name) for e in entries)
        for e in entries:
            paper = f"  [{e.paper}]" if e.paper else ""
            plugin = f"  (from {e.source})" if e.source != "builtin" else ""
            print(f"  {e.name:<{width}}  {e.summary}{paper}{plugin}")
            if args.cards and kind == "methods":
                card = registry.get(e.name).card
                for label, text in (("citation", card.citation), ("url", card.url), ("reproduces", card.reproduces),
                                    ("reference", card.reference), ("embedded claim", card.embedded_claim)):
                    if text:
                        print(f"  {'':<{width}}    {label}: {text}")
                for claim in getattr(registry.get(e.name), "claims", ()):  # decided by `bench claims`
                    arms = ", ".join(label for label, _ in claim.arms)
                    print(f"  {'':<{width}}    claim {claim.id}: {claim.statement} [{claim.metric} {claim.relation}: "
                          f"{arms}; paper: {claim.reference}]")
        print()
    return 0
