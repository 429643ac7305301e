"""The explore commands (neighbors, export, audit, map): each parses, calls one :mod:`embedpipe.explore` function, prints.

Kept beside the pipeline commands of :mod:`embedpipe.cli` (which registers them) so neither file
outgrows one screenful of concerns; heavy imports stay inside the command bodies.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .options import handle_errors, progress_factory


def _summary(found: Any) -> str:
    how = f"{found.backend}, {found.precision} on {found.device}" if found.backend == "torch" else "faiss flat index, fp32 on cpu"
    return f"{len(found.queries)} queries x {found.indices.shape[1]} neighbours in {found.seconds:.2f} s ({how})"


@click.command()
@click.argument("embeddings", type=click.Path())
@click.option("--query", type=click.Path(), default=None,
              help="Images to search for (folder or CSV manifest), embedded through the cache with the file's own backbone "
                   "[default: every row of EMBEDDINGS, each among the others].")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("--backend", type=click.Choice(["torch", "faiss"]), default="torch", show_default=True,
              help="torch: blocked exact matmul (GPU when there is one); faiss: exact flat index (the faiss extra).")
@click.option("--output", default="embeddings", show_default=True, help="Stored output to search (embeddings, logits, stageN).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Write query,rank,neighbor,similarity,label,split to a .csv or .json file [default: CSV on stdout].")
@click.option("--device", default="auto", show_default=True, help="Device for the search and the query images.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Of the search's matrix products; the result is fp32-exact at every precision.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Query images per batch [default: by device].")
@click.option("--workers", type=int, default=None, help="DataLoader decode workers for the query images.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary line.")
@click.pass_context
@handle_errors
def neighbors(ctx: click.Context, embeddings: str, query: str | None, k: int, backend: str, output: str, out_file: str | None,
              device: str, precision: str, cache_dir: str, batch_size: int | None, workers: int | None, quiet: bool) -> None:
    """Exact cosine nearest neighbours: within an embeddings file, or of new images against it.

    \b
    Example:
        embedpipe neighbors cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5 --k 5 --out neighbours.csv
        embedpipe neighbors cache/elpv-...h5 --query new-cells/ --k 3
        embedpipe neighbors cache/big-...h5 --backend faiss --out neighbours.json
    """
    import csv

    from ..config import RunConfig
    from ..explore import COLUMNS
    from ..explore import neighbors as run_neighbors

    quiet = ctx.obj["quiet"] or quiet
    found = run_neighbors(embeddings, query=query, k=k, backend=backend, output=output, device=device, precision=precision,
                          cache_dir=cache_dir, run=RunConfig(device=device, batch_size=batch_size, num_workers=workers),
                          progress=progress_factory(quiet))
    for path, reason in found.failed:
        click.echo(f"skipped {path}: {reason}", err=True)
    if out_file:
        found.write(out_file)
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(found.records())
    if not quiet:
        click.echo(_summary(found) + (f"; written to {out_file}" if out_file else ""), err=True)


@click.command("export")
@click.argument("embeddings", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--to", "to", type=click.Choice(["parquet", "npy", "faiss", "lance"]), required=True,
              help="parquet: columns + fixed-size-list embedding; npy: .npy + .json; faiss: cosine index + .json; lance: a table folder.")
@click.option("--output", default="embeddings", show_default=True, help="Stored output to export (embeddings, logits, stageN).")
@handle_errors
def export(embeddings: str, out: str, to: str, output: str) -> None:
    """Write an embeddings file's rows, embeddings and metadata for pandas, DuckDB, Spark, FAISS, LanceDB or NumPy.

    \b
    Example:
        embedpipe export cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5 elpv.parquet --to parquet
        duckdb -c "SELECT class, count(*) FROM 'elpv.parquet' GROUP BY class"
        embedpipe export cache/elpv-...h5 elpv.faiss --to faiss      # also writes elpv.json (ids -> rows)
        embedpipe export cache/elpv-...h5 elpv.npy --to npy
    """
    from ..explore import export as run_export

    done = run_export(embeddings, to, out, output=output)
    for path in done.paths:
        click.echo(str(path))
    click.echo(f"{done.rows} rows x {done.dims} as {done.format}", err=True)


@click.command()
@click.argument("embeddings", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for audit.json and audit.html.")
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity from which two rows are near duplicates [default: 0.90, measured on photos with the default backbone].")
@click.option("--leakage-threshold", type=float, default=None, help="The same for rows in different splits [default: 0.85].")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per row in the graph.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Folds of the out-of-fold logreg probabilities.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", default="embeddings", show_default=True, help="Stored output to audit.")
@click.option("--device", default="auto", show_default=True)
@click.option("--thumbnails", type=click.IntRange(min=0), default=64, show_default=True, help="Findings per section shown with images.")
@handle_errors
def audit(embeddings: str, out: str, threshold: float | None, leakage_threshold: float | None, k: int, folds: int, seed: int,
          output: str, device: str, thumbnails: int) -> None:
    """Find duplicates, train/test leakage, likely label errors and outliers; writes OUT/audit.html and audit.json.

    Exact duplicates come from the files' sha256, near ones from the exact neighbour graph; label
    issues and outliers from cleanlab (the cleanlab extra) fed out-of-fold logreg probabilities and that graph.

    \b
    Example:
        embedpipe audit cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5 --out reports/elpv-audit
        embedpipe audit cache/photos-...h5 --out reports/photos-audit --threshold 0.95
    """
    from ..explore import audit as run_audit
    from ..explore.audit import DUPLICATE_THRESHOLD, LEAKAGE_THRESHOLD
    from ..explore.pages import summary_lines

    result = run_audit(embeddings, out=out, threshold=DUPLICATE_THRESHOLD if threshold is None else threshold,
                       leakage_threshold=LEAKAGE_THRESHOLD if leakage_threshold is None else leakage_threshold,
                       k=k, folds=folds, seed=seed, output=output, device=device, thumbnails=thumbnails)
    for line in summary_lines(result):
        click.echo(line)
    near = result.nearest_similarity
    click.echo(f"nearest-neighbour similarity: 1% {near['p1']:.3f}, median {near['median']:.3f}, 99% {near['p99']:.3f}")
    if result.chained():
        click.echo(f"warning: one duplicate group holds {result.chained()} of {result.rows} images: at {result.threshold:g} this "
                   "backbone joins distinct images; raise --threshold and --leakage-threshold (e.g. to the 99% similarity)", err=True)
    click.echo(f"report: {result.out / 'audit.html'}", err=True)


@click.command("map")
@click.argument("embeddings", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for map.png, map.html and map.csv.")
@click.option("--method", type=click.Choice(["pca", "umap"]), default="pca", show_default=True,
              help="pca: of the L2-normalised embeddings, exact; umap: neighbourhoods, needs the umap extra.")
@click.option("--thumbnails", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Points (a seeded sample) whose hover shows their image on the page; keeps map.html to a few MB.")
@click.option("--output", default="embeddings", show_default=True, help="Stored output to map.")
@click.option("--seed", type=int, default=0, show_default=True, help="For the thumbnail sample and UMAP.")
@handle_errors
def map_command(embeddings: str, out: str, method: str, thumbnails: int, output: str, seed: int) -> None:
    """Draw the dataset as a 2-D map coloured by class, shaped by split: OUT/map.png, map.html (hover: image and path), map.csv.

    \b
    Example:
        embedpipe map cache/elpv-tf_efficientnet_lite0-c29b2595c6b7.h5 --out reports/elpv-map
        embedpipe map cache/elpv-...h5 --out reports/elpv-umap --method umap      # pip install 'embedpipe[umap]'
    """
    from ..explore import map_embeddings

    result = map_embeddings(embeddings, out=out, method=method, output=output, thumbnails=thumbnails, seed=seed)
    variance = (f"; axes hold {result.explained_variance[0]:.1%} and {result.explained_variance[1]:.1%} of the variance"
                if result.explained_variance else "")
    click.echo(f"{len(result.paths)} images mapped by {method.upper()} in {result.seconds:.2f} s{variance}; "
               f"{len(result.thumbnails)} with thumbnails")
    for name in ("map.png", "map.html", "map.csv"):
        click.echo(str(result.out / name))


COMMANDS = (neighbors, export, audit, map_command)
