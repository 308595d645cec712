def architectures_table(cfg: Any, keys: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """Tables 6-8: the architecture SPvR recommends at each of the paper's rates, beside the paper's."""
    from . import models

    rows = []
    for key in keys or list(cfg.models):
        setup = cfg.model(key)
        base = train_base(cfg, key, progress=progress)
        paper = PAPER_ARCHITECTURES[key]
        rows.append({"model": key, "rate": 0.0, "removed": 0.0, "params": base["params"], "size (MB)": base["size_mb"],
                     "layers": _prunable_count(base["spec"]), "architecture": models.spec_to_str(base["spec"]),
                     "paper size (MB)": paper[0.0][0], "paper architecture": paper[0.0][1]})
        for rate in setup.rates:
            rec = spvr_pruned(cfg, key, rate, progress=progress)
            p = paper.get(rate, (None, None))
            rows.append({"model": key, "rate": rate, "removed": rec["removed_fraction"], "params": rec["params_after"],
                         "size (MB)": rec["size_mb"], "layers": _prunable_count(rec["spec"]),
                         "architecture": rec["arch"], "paper size (MB)": p[0], "paper architecture": p[1]})
    return pd.DataFrame(rows)
