"""``data synth``, ``split``, ``import``, ``info``, ``verify`` and ``upload``: partitioned galaxy data sets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cai_bench.cli import options as o
from cai_bench.cli.app import data_app
from cai_bench.core.plan import check_size
from cai_bench.data.astro import catalogue_columns, file_kind, import_catalogue, refuse_columns
from cai_bench.data.partitions import dataset_info, split, synthesize, verify_dataset
from cai_bench.data.upload import upload
from cai_bench.render import bars, tool_views

SizeGb = Annotated[float, typer.Option("--gb", help="Data size in GB (GiB).")]
SizeMb = Annotated[float, typer.Option("--partition-mb", help="Partition size in MB (MiB).")]
NewDir = Annotated[Path, typer.Option("--out", help="Directory to create.")]
Replace = Annotated[bool, typer.Option("--force", help="Replace OUT if it already holds files.")]
Dataset = Annotated[Path, typer.Argument(help="Data set directory.")]
Sources = Annotated[
    list[Path], typer.Argument(help="Files in order: upstream TensorDataset .pt, FITS (.fits) or HDF5 (.h5, .hdf5).")
]
IdColumn = Annotated[
    str | None, typer.Option(help="FITS/HDF5: the column of object ids (int64 or string). [default: objid]")
]
MagColumns = Annotated[
    str | None,
    typer.Option(help="FITS/HDF5: five magnitude columns u,g,r,i,z, or one of shape (N, 5). "
                 "[default: dered_u..dered_z or u..z (FITS), magnitudes (HDF5)]"),
]  # fmt: skip
ZColumn = Annotated[
    str | None, typer.Option(help="FITS/HDF5: the true redshift column. [default: redshift or z, if any]")
]
RaColumn = Annotated[str | None, typer.Option(help="FITS/HDF5: the right ascension column, degrees. [default: ra]")]
DecColumn = Annotated[str | None, typer.Option(help="FITS/HDF5: the declination column, degrees. [default: dec]")]
ImagesAt = Annotated[
    str | None, typer.Option("--images", help="FITS: the image HDU, by name or number; HDF5: the dataset. [default: "
                             "the first 4-D image HDU; images]")
]  # fmt: skip
Destination = Annotated[str, typer.Argument(help="s3://bucket/prefix to copy it to.")]
Endpoint = Annotated[
    str | None, typer.Option(help="S3 endpoint (an S3-compatible store); default: AWS_ENDPOINT_URL_S3 or AWS.")
]
Jobs = Annotated[int, typer.Option(min=1, help="Objects uploaded at once.")]
SameSeed = Annotated[int, typer.Option(min=0, help="Random seed (0 or more): the same seed gives the same bytes.")]


@data_app.command("synth")
def data_synth(
    gb: SizeGb, out: NewDir, partition_mb: SizeMb = 25.0, seed: SameSeed = 0, force: Replace = False,
    quiet: o.Quiet = False,
) -> None:  # fmt: skip
    """Generate realistic synthetic SDSS-like galaxies, one partition at a time."""
    check_size(gb, "--gb")
    check_size(partition_mb, "--partition-mb")
    started = time.perf_counter()
    with bars.count_progress(f"synthesizing {gb:g} GB", "samples", quiet) as bar:
        manifest = synthesize(out, gb, partition_mb, seed, overwrite=force, progress=bar)
    tool_views.show_synthesized(out, manifest, time.perf_counter() - started)


@data_app.command("split")
def data_split(src: Dataset, partition_mb: SizeMb, out: NewDir, force: Replace = False, quiet: o.Quiet = False) -> None:
    """Re-partition a data set without regenerating it (same samples, same order)."""
    check_size(partition_mb, "--partition-mb")
    with bars.count_progress(f"splitting into {partition_mb:g} MB", "samples", quiet) as bar:
        manifest = split(src, partition_mb, out, overwrite=force, progress=bar)
    tool_views.show_split(out, manifest, partition_mb)


@data_app.command("import")
def data_import(
    sources: Sources, partition_mb: SizeMb, out: NewDir, id_column: IdColumn = None, mag_columns: MagColumns = None,
    z_column: ZColumn = None, ra_column: RaColumn = None, dec_column: DecColumn = None, images: ImagesAt = None,
    force: Replace = False, quiet: o.Quiet = False,
) -> None:  # fmt: skip
    """Convert survey cutouts (FITS, HDF5) or upstream TensorDataset .pt files into partitions.

    FITS: an image HDU (N, 5, 32, 32) in ugriz order or (N, 32, 32, 5), and a binary table with ids, magnitudes
    and optionally ra, dec and true redshifts; HDF5: datasets images, magnitudes, objid [, ra, dec, redshift].
    Images are read a slice at a time; ids, ra and dec go into the data set's objects table. FITS and HDF5 need
    the astro extra. .pt: read with torch.load(weights_only=True), allowing only TensorDataset; images
    [N,64,64,5] are permuted and centre-cropped; ids are row numbers.
    """
    check_size(partition_mb, "--partition-mb")
    options = {"--id-column": id_column, "--mag-columns": mag_columns, "--z-column": z_column,
               "--ra-column": ra_column, "--dec-column": dec_column, "--images": images}  # fmt: skip
    kind = file_kind(list(sources))
    with bars.count_progress(f"importing into {partition_mb:g} MB partitions", "samples", quiet) as bar:
        if kind == "pt":
            refuse_columns(options)
            from cai_bench.data.upstream import import_upstream  # torch: reads the upstream files

            manifest = import_upstream(sources, out, partition_mb, overwrite=force, progress=bar)
        else:
            columns = catalogue_columns(options)
            manifest = import_catalogue(sources, out, partition_mb, columns, overwrite=force, progress=bar)
    tool_views.show_imported(out, manifest, len(sources), partition_mb)


@data_app.command("info")
def data_info(directory: Dataset, as_json: o.AsJson = False) -> None:
    """What a data set holds, from its manifest (no partition is read)."""
    tool_views.show_data_info(directory, dataset_info(directory), as_json)


@data_app.command("verify")
def data_verify(directory: Dataset) -> None:
    """Read every partition and compare sizes, sha256 checksums, format and values with the manifest."""
    tool_views.show_verified(directory, *verify_dataset(directory))


@data_app.command("upload")
def data_upload(
    directory: Dataset, destination: Destination, endpoint_url: Endpoint = None, jobs: Jobs = 8, quiet: o.Quiet = False
) -> None:
    """Copy a data set to S3: parallel, multipart, checksummed; objects already there unchanged are skipped, so
    a rerun resumes. The manifest goes last: a prefix with a manifest holds a whole data set."""
    with bars.count_progress(f"uploading to {destination}", "bytes", quiet) as bar:
        tool_views.show_upload(upload(directory, destination, endpoint_url, jobs=jobs, progress=bar))
