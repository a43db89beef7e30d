"""Chest X-ray report builders of hybridmed: IU X-ray and MIMIC-CXR(-JPG), with images or text only.

Every builder writes the 'cxr_reports' layout of `medguide_jax.data.cxr` (one record per
image, its study's report sections beside it; a text-only variant one record per study with
image b'') and its metadata: label_names, text_only, the WordPiece tokenizer trained on the
TRAINING split's findings and impressions (one pair per training study, however many images
it has), and a build summary. Report text is read and normalised by
`medguide_jax.data.reports` (whitespace collapsed, de-identification placeholders as [DEID]).

  iu_xray        Indiana University chest X-rays (Open-i; Demner-Fushman et al., JAMIA 2016),
                 in either layout, detected from the manual dir (option layout=auto|openi|csv;
                 the one used is in the summary):
                   openi  NLMCXR_png/<image id>.png (NLMCXR_png.tgz extracted) with the reports
                          NLMCXR_reports.tgz (read in memory) or its extracted
                          ecgen-radiology/; each report's <parentImage id> names its images.
                   csv    the Kaggle export: indiana_reports.csv, indiana_projections.csv and
                          the images in images/images_normalized/ or images_normalized/.
                 auto takes openi when NLMCXR_png/ and the reports are there, else csv.
                 Views (option `views`, default ('frontal',); ('frontal', 'lateral') for
                 both): the projection comes from indiana_projections.csv. The Open-i XML does
                 not give it: with openi, an indiana_projections.csv in the manual dir (the
                 export's table, matched through `reports.openi_filename`) gives it, and an
                 image it does not list is left out (counted: images_without_projection);
                 without the table every image is kept, with view '' (the summary's
                 view_source says so). view is 'FRONTAL' / 'LATERAL' (upper case).
                 Images are stored as 8-bit grey PNG, shrunk (area averaging) so the long side
                 is at most `max_side` (default 512; 0 keeps the native size).
  iu_xray_text   the IU reports only (one record per study), from NLMCXR_reports.tgz, an
                 extracted ecgen-radiology/, or indiana_reports.csv (auto: in this order, as
                 the XML is the release and the CSV a derived export). The project's
                 ../shared/data/cxr_iu_xray_reports holds all three: the XML has 3,955
                 reports (3,419 with findings and impression, 104 without any image), the CSV
                 the 3,851 with images (3,331 with both); layout=csv reads the CSV.
  mimic_cxr      MIMIC-CXR-JPG 2.0.0 (Johnson et al., PhysioNet): the JPEGs
                 files/pXX/p<subject>/s<study>/<dicom_id>.jpg, the tables
                 mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz, and the free-text reports
                 of MIMIC-CXR 2.0.0 (mimic-cxr-reports.zip) as files/pXX/p<subject>/s<study>.txt,
                 under the manual dir itself (unzipped over the JPG tree) or under a reports/
                 subfolder, or the zip itself in either place (read in memory). Reports are
                 sectioned by `reports.split_sections` (MIMIC-CXR's section-parser
                 conventions; the convention counts are in the summary). Views: ViewPosition
                 in `views` (default ('AP', 'PA'); 'frontal' stands for both, 'lateral' for
                 LATERAL and LL; an empty ViewPosition is ''). The official split
                 (validate -> validation), checked patient-disjoint. JPEG bytes as they are,
                 unless `max_side` > 0 asks to shrink: a larger image is then decoded, made
                 grey, shrunk and stored as PNG. Labels: the 14 CheXpert columns in the CSV's
                 order: 1 positive, 0 negative, -1 uncertain, blank -> NaN (not mentioned); a
                 study without a CheXpert row has all NaN (counted: studies_without_labels).
  mimic_cxr_text the MIMIC-CXR reports only (one record per study of the split table): needs
                 the reports and mimic-cxr-2.0.0-split.csv.gz; labels from the CheXpert table
                 when it is there (else label_names [] and no labels).

Patients and splits: IU X-ray has no patient ids, so one study is one patient (patient =
the study uid); its splits are 80/10/10 by a hash of the uid (`image_folder.hash_split`):
stable, the same study in the same split in iu_xray and iu_xray_text. MIMIC-CXR: patient =
subject_id, the official split. Either way no patient is in two splits
(`bags.check_patient_splits`, an error naming the patient).

Sections (option `require`): HybridMED needs both findings and impression, so by default
('both') only studies with both are written; 'either' keeps those with one of them. Studies
with neither are never written. Every study lacking findings or impression is counted (and
the first 50 named) in the summary's 'lacking', those left out for it (or for having no
image of the asked views) in 'left_out'.

Missing files (option `missing_files`): an image (of the asked views) that a report or table
lists but the folder lacks, or a MIMIC-CXR report file that is absent, is an error naming the
path and the report / table line (default 'error'); 'skip' leaves it out and counts it
(summary 'missing_files'; a study left with no image is left out). Encoding (option
`encoding_errors`): a report or table that is not valid UTF-8 is an error naming the file and
byte offset (default 'strict'); 'replace' puts U+FFFD in place and the summary counts them.

Every other inconsistency (a missing table or column, a bad split or label value, a dicom of
the metadata table missing from the split table, a study in two splits) is an error naming
the file and line or member. Option values that differ from the defaults make a separate
builder config (its own folder), so two settings never share files.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import math
import os
import re
import zipfile
import zlib
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep import image_folder
from medguide_jax.data import bags
from medguide_jax.data import builders
from medguide_jax.data import cxr
from medguide_jax.data import images
from medguide_jax.data import readers
from medguide_jax.data import reports

SPLITS = ("train", "validation", "test")
REQUIRE = ("both", "either")
MISSING_FILES = ("error", "skip")
IU_LAYOUTS = ("auto", "openi", "csv")
IU_VIEWS = ("frontal", "lateral")
LISTED = cxr.LISTED
ReportFormatError = reports.ReportFormatError


class MissingFileError(ReportFormatError, FileNotFoundError):
  """A file the release lists (an image, a report, a table) is absent; names its path."""


def _choice(option: str, value, choices: Sequence[str]) -> str:
  value = str(value).strip().lower()
  if value not in choices:
    raise ValueError(f"{option}={value!r}: use one of {list(choices)}")
  return value


class _Listing:
  """Counted reasons, each with the first LISTED items named."""

  def __init__(self, key: str = "listed"):
    self.key = key
    self.entries: dict[str, dict] = {}

  def add(self, reason: str, item: str) -> None:
    entry = self.entries.setdefault(reason, {"count": 0, self.key: []})
    entry["count"] += 1
    if len(entry[self.key]) < LISTED:
      entry[self.key].append(item)

  def count(self, reason: str) -> int:
    return self.entries.get(reason, {}).get("count", 0)

  def as_dict(self) -> dict:
    return {k: dict(v) for k, v in self.entries.items()}


# ---------------------------------------------------------------------------------------------
# Options as builder configs


@dataclasses.dataclass(eq=False)
class CxrReportsConfig(tfds.core.BuilderConfig):
  """Options shared by every builder here (module docstring)."""
  require: str = "both"
  encoding_errors: str = "strict"


@dataclasses.dataclass(eq=False)
class IuXrayTextConfig(CxrReportsConfig):
  layout: str = "auto"


@dataclasses.dataclass(eq=False)
class IuXrayConfig(IuXrayTextConfig):
  views: tuple[str, ...] = ("frontal",)
  max_side: int = 512
  missing_files: str = "error"


@dataclasses.dataclass(eq=False)
class MimicCxrTextConfig(CxrReportsConfig):
  missing_files: str = "error"


@dataclasses.dataclass(eq=False)
class MimicCxrConfig(MimicCxrTextConfig):
  views: tuple[str, ...] = ("AP", "PA")
  max_side: int = 0


def _iu_views(views) -> tuple[str, ...]:
  views = [views] if isinstance(views, str) else list(views)
  out = sorted({_choice("views", v, IU_VIEWS) for v in views})
  if not out:
    raise ValueError(f"views=(): name at least one of {list(IU_VIEWS)}")
  return tuple(out)


def _mimic_views(views) -> tuple[str, ...]:
  views = [views] if isinstance(views, str) else list(views)
  out = set()
  for v in views:
    v = " ".join(str(v).upper().split())
    out.update({"FRONTAL": ("AP", "PA"), "LATERAL": ("LATERAL", "LL")}.get(v, (v,)))
  if not out:
    raise ValueError("views=(): name at least one ViewPosition (AP, PA, LATERAL, ...)")
  return tuple(sorted(out))


def _checked(values: dict) -> dict:
  """Option values validated and in canonical form."""
  out = dict(values)
  out["require"] = _choice("require", out["require"], REQUIRE)
  out["encoding_errors"] = _choice("encoding_errors", out["encoding_errors"],
                                   reports.ENCODING_ERRORS)
  if "layout" in out:
    out["layout"] = _choice("layout", out["layout"], IU_LAYOUTS)
  if "missing_files" in out:
    out["missing_files"] = _choice("missing_files", out["missing_files"], MISSING_FILES)
  if "max_side" in out:
    out["max_side"] = int(out["max_side"])
    if out["max_side"] < 0:
      raise ValueError(f"max_side={out['max_side']}: use 0 (native size) or a size >= 1")
  return out


def _name_part(key: str, value) -> str:
  if key == "views":
    return "views_" + "_".join(re.sub(r"[^a-z0-9]", "", str(v).lower()) for v in value)
  if key == "max_side":
    return "native" if value == 0 else f"side{value}"
  if key == "missing_files":
    return f"missing_{value}"
  return str(value)


def make_config(config_cls: type, views_fn=None, **given) -> CxrReportsConfig | None:
  """The config of the options `given` (builders.options_config; None: the default)."""
  def canonical(values):
    if "views" in values:
      values["views"] = views_fn(values["views"])
    return _checked(values)
  return builders.options_config(config_cls, given, canonical=canonical, name_part=_name_part)


class _CxrBuilder(cxr.ReportBuilder):
  """Shared set-up: the config from the options (module docstring)."""

  CONFIG_CLASS: type = CxrReportsConfig
  VIEWS_FN = None

  def _configured(self, kwargs: dict, **options) -> dict:
    config = make_config(self.CONFIG_CLASS, type(self).VIEWS_FN, **options)
    if config is not None:
      kwargs["config"] = config
    return kwargs

  @property
  def options(self):
    return self.builder_config

  def _keep(self, report: reports.Report) -> bool:
    lacking = report.lacking()
    if self.options.require == "both":
      return not lacking
    return len(lacking) < 2


def _study_key(study: str):
  return (len(study), study)


# ---------------------------------------------------------------------------------------------
# IU X-ray

IU_OPENI_IMAGES = "NLMCXR_png"
IU_CSV_IMAGE_DIRS = (os.path.join("images", "images_normalized"), "images_normalized")

IU_XRAY_INSTRUCTIONS = f"""\
IU X-ray (Indiana University chest X-ray collection, Open-i / NLM; CC BY-NC-ND 4.0; cite
Demner-Fushman et al., JAMIA 2016;23(2):304-310). The manual dir holds either layout:
  openi (https://openi.nlm.nih.gov/faq, 'Indiana University chest X-ray collection'):
    {IU_OPENI_IMAGES}/CXR<n>_IM-....png     NLMCXR_png.tgz extracted
    {reports.OPENI_TGZ}                  as downloaded (read without extracting), or its
                                         extracted {reports.OPENI_FOLDER}/<n>.xml
    {reports.IU_PROJECTIONS_CSV}             optional: the views (Frontal/Lateral); without it
                                         every image is kept, view ''
  csv (Kaggle 'raddar/chest-xrays-indiana-university', unzipped):
    {reports.IU_REPORTS_CSV}, {reports.IU_PROJECTIONS_CSV}
    images/images_normalized/<filename>  (or images_normalized/<filename>)
  python -m data_prep.build iu_xray --manual_dir=<manual_dir> --data_dir=<data_dir> \\
      [--option views=frontal,lateral] [--option layout=csv] [--option max_side=512]
"""

IU_XRAY_TEXT_INSTRUCTIONS = f"""\
IU X-ray reports only (Open-i / NLM; CC BY-NC-ND 4.0). The manual dir holds one of
{reports.OPENI_TGZ} (the Open-i reports, read without extracting), its extracted
{reports.OPENI_FOLDER}/ folder, or {reports.IU_REPORTS_CSV} (the Kaggle export); the project's
copy of all three is ../shared/data/cxr_iu_xray_reports (no images needed).
  python -m data_prep.build iu_xray_text --manual_dir=../shared/data/cxr_iu_xray_reports \\
      --data_dir=<data_dir> [--option layout=csv]
"""


@dataclasses.dataclass
class IuSource:
  """Where the reports (and images) of an IU manual dir are."""
  layout: str                    # 'openi' | 'csv'
  reports: str                   # the tgz, the ecgen-radiology folder or the CSV
  projections: str | None        # indiana_projections.csv, when used
  image_dir: str | None          # NLMCXR_png/ or images_normalized/, when images are read

  def describe(self) -> str:
    parts = [os.path.basename(self.reports.rstrip(os.sep))]
    if self.projections:
      parts.append(os.path.basename(self.projections))
    if self.image_dir:
      parts.append(os.path.relpath(self.image_dir, os.path.dirname(self.reports.rstrip(
          os.sep))) + "/")
    return f"{self.layout} ({', '.join(parts)})"


def _openi_reports_path(root: str) -> str | None:
  for name in (reports.OPENI_TGZ, reports.OPENI_FOLDER):
    path = os.path.join(root, name)
    if os.path.isfile(path) or (name == reports.OPENI_FOLDER and os.path.isdir(path)):
      return path
  return None


def find_iu_source(root: str, layout: str, *, with_images: bool,
                   instructions: str) -> IuSource:
  """The IU layout of `root` (`layout` 'auto', 'openi' or 'csv'); an error naming what is
  missing otherwise."""
  openi_reports = _openi_reports_path(root)
  reports_csv = os.path.join(root, reports.IU_REPORTS_CSV)
  projections = os.path.join(root, reports.IU_PROJECTIONS_CSV)
  projections = projections if os.path.isfile(projections) else None
  png = os.path.join(root, IU_OPENI_IMAGES)
  csv_images = next((os.path.join(root, d) for d in IU_CSV_IMAGE_DIRS
                     if os.path.isdir(os.path.join(root, d))), None)
  openi_ok = openi_reports is not None and (not with_images or os.path.isdir(png))
  csv_ok = os.path.isfile(reports_csv) and (
      not with_images or (csv_images is not None and projections is not None))
  if layout == "auto":
    layout = "openi" if openi_ok else "csv" if csv_ok else ""
  if layout == "openi" and openi_ok:
    return IuSource("openi", openi_reports, projections if with_images else None,
                    png if with_images else None)
  if layout == "csv" and csv_ok:
    return IuSource("csv", reports_csv, projections if with_images else None,
                    csv_images if with_images else None)
  # (what a layout needs, whether it is there)
  wanted = {"openi": [(f"{reports.OPENI_TGZ} or {reports.OPENI_FOLDER}/",
                       openi_reports is not None)]
                     + ([(f"{IU_OPENI_IMAGES}/", os.path.isdir(png))] if with_images else []),
            "csv": [(reports.IU_REPORTS_CSV, os.path.isfile(reports_csv))]
                   + ([(reports.IU_PROJECTIONS_CSV, projections is not None),
                       (" or ".join(f"{d}/" for d in IU_CSV_IMAGE_DIRS),
                        csv_images is not None)] if with_images else [])}
  asked = [layout] if layout else ["openi", "csv"]
  lacking = "; ".join(
      f"{k} needs {', '.join(w for w, _ in wanted[k])}: missing "
      f"{', '.join(w for w, there in wanted[k] if not there)}" for k in asked)
  raise MissingFileError(f"{root}: not an IU X-ray release ({lacking}).\n{instructions}")


def read_iu_reports(source: IuSource, decoder: reports.Decoder) -> list[reports.Report]:
  """The reports of `source`; with openi and a projections table, the images' views (None
  for an image the table does not list)."""
  if source.layout == "csv":
    return reports.read_iu_csv(source.reports, source.projections, decoder=decoder)
  found = reports.read_openi(source.reports, decoder=decoder)
  if source.projections:
    views = {name: view for rows in reports.read_iu_projections(
        source.projections, decoder=decoder).values() for name, view in rows}
    for r in found:
      r.images = [(image_id, views.get(reports.openi_filename(image_id, r.study) or "", None))
                  for image_id, _ in r.images]
  return found


class IuXrayText(_CxrBuilder):
  """IU X-ray reports, text only: one record per study (data_prep/cxr_reports.py)."""

  name = "iu_xray_text"
  TEXT_ONLY = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = IU_XRAY_TEXT_INSTRUCTIONS
  CONFIG_CLASS = IuXrayTextConfig
  BUILDER_CONFIGS = [IuXrayTextConfig(
      name="default", description="Studies with findings and impression; auto layout.")]

  def __init__(self, *, require: str | None = None, encoding_errors: str | None = None,
               layout: str | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of IuXrayTextConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, require=require,
                                        encoding_errors=encoding_errors, layout=layout))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    source = find_iu_source(root, self.options.layout, with_images=False,
                            instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    decoder = reports.Decoder(self.options.encoding_errors)
    found = read_iu_reports(source, decoder)
    summary, left_out = cxr.Summary(), _Listing("studies")
    by_split = {s: [] for s in SPLITS}
    without_images = 0
    for r in found:
      for section in r.lacking():
        summary.lacks(section, r.study)
      if not self._keep(r):
        left_out.add("lacking_sections", r.study)
        continue
      without_images += not r.images and source.layout == "openi"
      by_split[image_folder.hash_split(r.study)].append(r)
    return self._finish(by_split, summary, left_out, decoder, source, len(found), extra={
        "studies_without_images": (without_images if source.layout == "openi" else
                                   "not known (the CSV lists studies with images only)")})

  def _finish(self, by_split, summary, left_out, decoder, source, n_read, extra=None,
              chosen=None):
    bags.check_patient_splits({s: [r.patient for r in v] for s, v in by_split.items()},
                              self.name)
    for split, studies in by_split.items():
      summary.count(split, "studies", len(studies))
      summary.count(split, "records", len(studies) if chosen is None
                    else sum(len(chosen[r.study]) for r in studies))
    texts = [t for r in by_split["train"] for t in (r.findings, r.impression) if t]
    if not texts:
      raise ReportFormatError(f"{source.reports}: no training study with findings or "
                              "impression to train the tokenizer on")
    self.set_metadata(train_texts=texts, label_names=[], summary={
        **summary.as_dict(), "layout": source.describe(), "reports_read": n_read,
        "left_out": left_out.as_dict(), "require": self.options.require,
        "patients": "IU X-ray has no patient ids: one study = one patient (patient = uid)",
        "split": "80/10/10 by hash of the study uid (image_folder.hash_split)",
        "encoding": decoder.summary(), **(extra or {})})
    return {s: self._generate_examples(v, chosen) for s, v in by_split.items() if v}

  def _generate_examples(self, studies, chosen=None) -> Iterator[tuple[str, dict]]:
    del chosen
    for r in studies:
      yield r.study, cxr.record(image=b"", view="", id=r.study, study=r.study,
                                patient=r.patient, **r.sections())


class IuXray(IuXrayText):
  """IU X-ray chest X-rays with their reports, one record per image (data_prep/cxr_reports.py)."""

  name = "iu_xray"
  TEXT_ONLY = False
  MANUAL_DOWNLOAD_INSTRUCTIONS = IU_XRAY_INSTRUCTIONS
  CONFIG_CLASS = IuXrayConfig
  VIEWS_FN = staticmethod(_iu_views)
  BUILDER_CONFIGS = [IuXrayConfig(
      name="default", description="Frontal views, studies with findings and impression, "
      "PNG with long side <= 512.")]

  def __init__(self, *, views: Sequence[str] | None = None, max_side: int | None = None,
               missing_files: str | None = None, require: str | None = None,
               encoding_errors: str | None = None, layout: str | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of IuXrayConfig (None: the default's)."""
    kwargs = self._configured(kwargs, views=views, max_side=max_side,
                              missing_files=missing_files, require=require,
                              encoding_errors=encoding_errors, layout=layout)
    _CxrBuilder.__init__(self, **kwargs)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    options = self.options
    source = find_iu_source(root, options.layout, with_images=True,
                            instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    decoder = reports.Decoder(options.encoding_errors)
    found = read_iu_reports(source, decoder)
    known_views = source.layout == "csv" or source.projections is not None
    summary, left_out = cxr.Summary(), _Listing("studies")
    missing, unprojected = _Listing(), _Listing()
    by_split = {s: [] for s in SPLITS}
    chosen: dict[str, list[tuple[str, str, str]]] = {}   # study -> [(name, view, path)]
    for r in found:
      for section in r.lacking():
        summary.lacks(section, r.study)
      if not self._keep(r):
        left_out.add("lacking_sections", r.study)
        continue
      kept = []
      for name, view in r.images:
        if known_views and view is None:   # openi image the projections table lacks
          unprojected.add("images", f"{r.study}/{name}")
          continue
        view = view or ""
        if known_views and view.lower() not in options.views:
          continue
        filename = name if source.layout == "csv" else f"{name}.png"
        path = os.path.join(source.image_dir, filename)
        if not os.path.isfile(path):
          if options.missing_files == "error":
            raise MissingFileError(
                f"{path}: image listed by {r.where} is not in the image folder (build with "
                "the option missing_files=skip to leave such images out, counted)")
          missing.add("images", path)
          continue
        kept.append((filename, view, path))
      if not kept:
        left_out.add(_no_image_reason(r, options.views, known_views), r.study)
        continue
      chosen[r.study] = kept
      by_split[image_folder.hash_split(r.study)].append(r)
    for split, studies in by_split.items():
      summary.count(split, "images", sum(len(chosen[r.study]) for r in studies))
    view_source = (reports.IU_PROJECTIONS_CSV if known_views else
                   f"none: {reports.IU_PROJECTIONS_CSV} is absent, so every image of the "
                   "Open-i reports is kept, view ''")
    return self._finish(by_split, summary, left_out, decoder, source, len(found),
                        chosen=chosen, extra={
        "views": list(options.views), "view_source": view_source,
        "images_without_projection": unprojected.count("images"),
        "images_without_projection_listed": unprojected.as_dict().get(
            "images", {}).get("listed", []),
        "missing_files": {"policy": options.missing_files, "count": missing.count("images"),
                          "listed": missing.as_dict().get("images", {}).get("listed", [])},
        "max_side": options.max_side})

  def _generate_examples(self, studies, chosen=None) -> Iterator[tuple[str, dict]]:
    max_side = self.options.max_side or None
    items = [(r, name, view, path) for r in studies for name, view, path in chosen[r.study]]

    def encode(item):
      r, name, view, path = item
      # Grey (the IU PNGs are 8-bit grey; a 16-bit one stays 16-bit), shrunk.
      png = images.encode_png(readers.downsize(readers.to_grey(readers.read_image(path)),
                                               max_side))
      key = f"{r.study}/{name}"
      return key, cxr.record(image=png, view=view, id=key, study=r.study, patient=r.patient,
                             **r.sections())

    yield from image_folder.ordered_map(encode, items)


def _no_image_reason(r: reports.Report, views, known_views: bool) -> str:
  """Why a study with sections has no image to write: none of the asked views (or none
  linked at all), or every one of them missing from the folder (missing_files=skip)."""
  if not r.images:
    return "no_image_linked"
  if known_views and not any(v and v.lower() in views for _, v in r.images):
    return "no_image_in_views"
  return "no_image_left"


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR

MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
MIMIC_REPORTS_ZIP = "mimic-cxr-reports.zip"
MIMIC_REPORTS_DIRS = ("", "reports")   # the reports' files/ tree: under the root, or reports/
MIMIC_SPLITS = {"train": "train", "validate": "validation", "validation": "validation",
                "test": "test"}
CHEXPERT_VALUES = {1.0, 0.0, -1.0}
_REPORT_MEMBER = re.compile(r"(?:^|/)files/p\d\d/p(\d+)/s(\d+)\.txt$")

MIMIC_CXR_INSTRUCTIONS = f"""\
MIMIC-CXR-JPG 2.0.0 (https://physionet.org/content/mimic-cxr-jpg/2.0.0/) with the reports of
MIMIC-CXR 2.0.0 (https://physionet.org/content/mimic-cxr/2.0.0/, mimic-cxr-reports.zip):
credentialed PhysioNet access and its data use agreement are required. The manual dir holds
  files/pXX/p<subject_id>/s<study_id>/<dicom_id>.jpg   the JPG release's images
  {MIMIC_METADATA}, {MIMIC_SPLIT}, {MIMIC_CHEXPERT}
  the reports: mimic-cxr-reports.zip unzipped over the same root (files/pXX/p<subject_id>/
  s<study_id>.txt beside the image folders) or into reports/ (reports/files/...), or the zip
  itself as {MIMIC_REPORTS_ZIP} or reports/{MIMIC_REPORTS_ZIP} (read without extracting).
  (.csv tables, uncompressed, are accepted too.)
  python -m data_prep.build mimic_cxr --manual_dir=<manual_dir> --data_dir=<data_dir> \\
      [--option views=frontal] [--option max_side=512]
"""

MIMIC_CXR_TEXT_INSTRUCTIONS = f"""\
MIMIC-CXR 2.0.0 reports (https://physionet.org/content/mimic-cxr/2.0.0/; credentialed access):
the manual dir holds the reports (mimic-cxr-reports.zip unzipped: files/pXX/p<subject_id>/
s<study_id>.txt, at the root or under reports/, or the zip itself as {MIMIC_REPORTS_ZIP}) and
{MIMIC_SPLIT} from MIMIC-CXR-JPG 2.0.0; {MIMIC_CHEXPERT}, when present, gives the labels.
  python -m data_prep.build mimic_cxr_text --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


def _table_path(root: str, name: str, instructions: str, required: bool = True) -> str | None:
  """The table `name` (.csv.gz) of the manual dir, or its uncompressed .csv."""
  for candidate in (name, name[:-len(".gz")]):
    path = os.path.join(root, candidate)
    if os.path.isfile(path):
      return path
  if required:
    raise MissingFileError(f"{os.path.join(root, name)} not found (nor "
                           f"{name[:-len('.gz')]}).\n{instructions}")
  return None


def read_table(path: str, required: Sequence[str], decoder: reports.Decoder
               ) -> Iterator[tuple[int, dict[str, str]]]:
  """(line, row) of a MIMIC table, gzipped or not; errors name the file."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if path.endswith(".gz"):
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise ReportFormatError(f"{path} cannot be read (not gzip, truncated?): {e}") from e
  return reports.read_csv_rows(path, required, decoder=decoder, raw=raw)


@dataclasses.dataclass
class MimicStudy:
  study: str
  subject: str
  split: str
  where: str                                  # the split table's first line of the study
  dicoms: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (dicom, view)


def read_mimic_split(path: str, decoder: reports.Decoder) -> dict[str, MimicStudy]:
  """study_id -> MimicStudy of the split table (dicoms in file order, view unknown yet).
  Errors name the file and line: an empty id, an unknown split, a study given two subjects
  or two splits, a dicom listed twice."""
  studies: dict[str, MimicStudy] = {}
  seen: dict[str, int] = {}
  for line, row in read_table(path, ("dicom_id", "study_id", "subject_id", "split"), decoder):
    where = f"{path} line {line}"
    dicom, study, subject = row["dicom_id"], row["study_id"], row["subject_id"]
    if not (dicom and study and subject):
      raise ReportFormatError(f"{where}: empty dicom_id, study_id or subject_id")
    split = MIMIC_SPLITS.get(row["split"].lower())
    if split is None:
      raise ReportFormatError(f"{where}: split {row['split']!r}; expected train, validate "
                              "or test")
    if dicom in seen:
      raise ReportFormatError(f"{where}: dicom_id {dicom} already on line {seen[dicom]}")
    seen[dicom] = line
    s = studies.setdefault(study, MimicStudy(study, subject, split, where))
    if (s.subject, s.split) != (subject, split):
      raise ReportFormatError(f"{where}: study {study} is subject {subject}, split {split} "
                              f"here but subject {s.subject}, split {s.split} at {s.where}")
    s.dicoms.append((dicom, ""))
  if not studies:
    raise ReportFormatError(f"{path}: no row")
  return studies


def read_mimic_views(path: str, studies: Mapping[str, MimicStudy],
                     decoder: reports.Decoder) -> None:
  """Sets each dicom's ViewPosition (upper case; '' when blank) from the metadata table.
  A dicom of the metadata missing from the split table, or of another study or subject
  there, is an error naming the line; a dicom of the split table without metadata is one
  naming it."""
  where_of = {d: s for s in studies.values() for d, _ in s.dicoms}
  views: dict[str, str] = {}
  for line, row in read_table(path, ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                              decoder):
    where = f"{path} line {line}"
    dicom = row["dicom_id"]
    s = where_of.get(dicom)
    if s is None:
      raise ReportFormatError(f"{where}: dicom_id {dicom} is not in the split table")
    if (row["study_id"], row["subject_id"]) != (s.study, s.subject):
      raise ReportFormatError(f"{where}: dicom_id {dicom} is study {row['study_id']} of "
                              f"subject {row['subject_id']}; the split table says study "
                              f"{s.study} of subject {s.subject} ({s.where})")
    views[dicom] = " ".join(row["ViewPosition"].upper().split())
  for s in studies.values():
    for i, (dicom, _) in enumerate(s.dicoms):
      if dicom not in views:
        raise ReportFormatError(f"{path}: no row for dicom_id {dicom} (study {s.study}, "
                                f"in the split table: {s.where})")
      s.dicoms[i] = (dicom, views[dicom])


def read_chexpert(path: str, decoder: reports.Decoder
                  ) -> tuple[list[str], dict[tuple[str, str], np.ndarray]]:
  """(the label names in the table's order, (subject, study) -> float32 labels: 1, 0, -1,
  NaN for blank). A value other than those, or a study listed twice, is an error naming the
  file, line and column."""
  rows = read_table(path, ("subject_id", "study_id"), decoder)
  names, labels = None, {}
  lines = {}
  for line, row in rows:
    if names is None:
      names = [k for k in row if k not in ("subject_id", "study_id")]
    key = (row["subject_id"], row["study_id"])
    if key in lines:
      raise ReportFormatError(f"{path} line {line}: study {key[1]} of subject {key[0]} "
                              f"already on line {lines[key]}")
    lines[key] = line
    values = np.full(len(names), np.nan, np.float32)
    for i, name in enumerate(names):
      text = row[name]
      if text == "":
        continue
      try:
        value = float(text)
      except ValueError:
        value = math.nan
      if value not in CHEXPERT_VALUES:
        raise ReportFormatError(f"{path} line {line}, column {name!r}: {text!r}; expected "
                                "1.0, 0.0, -1.0 or blank")
      values[i] = value
    labels[key] = values
  if names is None:
    raise ReportFormatError(f"{path}: no row")
  return names, labels


class MimicReports:
  """The MIMIC-CXR report files, found under the manual dir (MIMIC_REPORTS_DIRS) or in
  mimic-cxr-reports.zip there (read in memory)."""

  def __init__(self, root: str):
    self.root = root
    self.trees = [os.path.join(root, d, "files") if d else os.path.join(root, "files")
                  for d in MIMIC_REPORTS_DIRS]
    self.zip_path = next((p for p in (os.path.join(root, d, MIMIC_REPORTS_ZIP)
                                      for d in MIMIC_REPORTS_DIRS) if os.path.isfile(p)), None)
    self._zip, self._members = None, {}
    if self.zip_path:
      try:
        self._zip = zipfile.ZipFile(self.zip_path)
      except (OSError, zipfile.BadZipFile) as e:
        raise ReportFormatError(f"{self.zip_path} cannot be read as a zip file: {e}") from e
      for name in self._zip.namelist():
        m = _REPORT_MEMBER.search(name)
        if m:
          self._members[(m.group(1), m.group(2))] = name

  def candidates(self, subject: str, study: str) -> list[str]:
    relative = os.path.join(f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
    return [os.path.join(t, relative) for t in self.trees]

  def read(self, subject: str, study: str) -> tuple[bytes, str] | None:
    """(the report's bytes, where) or None when it is nowhere."""
    for path in self.candidates(subject, study):
      if os.path.isfile(path):
        with open(path, "rb") as f:
          return f.read(), path
    member = self._members.get((subject, study))
    if member is not None:
      try:
        return self._zip.read(member), f"{self.zip_path}: member {member}"
      except (OSError, zipfile.BadZipFile, zlib.error) as e:
        raise ReportFormatError(f"{self.zip_path}: member {member} cannot be read: {e}") \
            from e
    return None

  def close(self):
    if self._zip is not None:
      self._zip.close()


class MimicCxrText(_CxrBuilder):
  """MIMIC-CXR reports, text only: one record per study (data_prep/cxr_reports.py)."""

  name = "mimic_cxr_text"
  TEXT_ONLY = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = MIMIC_CXR_TEXT_INSTRUCTIONS
  CONFIG_CLASS = MimicCxrTextConfig
  BUILDER_CONFIGS = [MimicCxrTextConfig(
      name="default", description="Studies with findings and impression, official split.")]
  NEEDS_LABELS = False

  def __init__(self, *, require: str | None = None, encoding_errors: str | None = None,
               missing_files: str | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of MimicCxrTextConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, require=require,
                                        encoding_errors=encoding_errors,
                                        missing_files=missing_files))

  def _read_tables(self, root: str, decoder: reports.Decoder):
    instructions = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    studies = read_mimic_split(_table_path(root, MIMIC_SPLIT, instructions), decoder)
    chexpert = _table_path(root, MIMIC_CHEXPERT, instructions, required=self.NEEDS_LABELS)
    names, labels = read_chexpert(chexpert, decoder) if chexpert else ([], {})
    return studies, names, labels, chexpert

  def _select_images(self, root, study, missing):
    """[(dicom, view, path)] of a study's images to write; text only: one empty entry, the
    study's one record."""
    del root, study, missing
    return [("", "", "")]

  def _summary_extra(self) -> dict:
    return {}

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    options = self.options
    decoder = reports.Decoder(options.encoding_errors)
    studies, names, labels, chexpert = self._read_tables(root, decoder)
    store = MimicReports(root)
    summary, left_out, missing = cxr.Summary(), _Listing("studies"), _Listing()
    conventions = collections.Counter()
    by_split = {s: [] for s in SPLITS}
    chosen, label_of = {}, {}
    no_labels = _Listing("studies")
    try:
      for key in sorted(studies, key=_study_key):
        s = studies[key]
        found = store.read(s.subject, s.study)
        if found is None:
          where = ", ".join(store.candidates(s.subject, s.study)) + (
              f" or {store.zip_path}" if store.zip_path else "")
          if options.missing_files == "error":
            raise MissingFileError(
                f"report of study {s.study} (subject {s.subject}, {s.where}) not found: "
                f"looked for {where} (build with the option missing_files=skip to leave "
                "such studies out, counted)")
          missing.add("reports", store.candidates(s.subject, s.study)[0])
          continue
        r = reports.read_mimic_report(found[0], found[1], study=s.study, patient=s.subject,
                                      decoder=decoder)
        r.images = list(s.dicoms)
        conventions[r.convention] += 1
        for section in r.lacking():
          summary.lacks(section, s.study)
        if not self._keep(r):
          left_out.add("lacking_sections", s.study)
          continue
        kept = self._select_images(root, s, missing)
        if not kept:
          left_out.add("no_image_in_views" if not any(
              v in options.views for _, v in s.dicoms) else "no_image_left", s.study)
          continue
        chosen[s.study] = kept
        if names:
          label_of[s.study] = labels.get((s.subject, s.study))
          if label_of[s.study] is None:
            no_labels.add("studies", s.study)
            label_of[s.study] = np.full(len(names), np.nan, np.float32)
        by_split[s.split].append(r)
    finally:
      store.close()
    bags.check_patient_splits({sp: [r.patient for r in v] for sp, v in by_split.items()},
                              self.name)
    for split, kept_studies in by_split.items():
      summary.count(split, "studies", len(kept_studies))
      summary.count(split, "patients", len({r.patient for r in kept_studies}))
      summary.count(split, "records", sum(len(chosen[r.study]) for r in kept_studies))
    texts = [t for r in by_split["train"] for t in (r.findings, r.impression) if t]
    if not texts:
      raise ReportFormatError(f"{root}: no training study with findings or impression to "
                              "train the tokenizer on")
    extra = self._summary_extra()
    self.set_metadata(train_texts=texts, label_names=names, summary={
        **summary.as_dict(), "reports_read": sum(conventions.values()),
        "left_out": left_out.as_dict(), "require": options.require,
        "conventions": dict(conventions),
        "split": "official (mimic-cxr-2.0.0-split: validate -> validation), patient-disjoint",
        "labels": (f"{os.path.basename(chexpert)}: 1 positive, 0 negative, -1 uncertain, "
                   "NaN blank" if chexpert else "none (no CheXpert table)"),
        "studies_without_labels": no_labels.as_dict().get("studies", {"count": 0,
                                                                      "studies": []}),
        "missing_files": {"policy": options.missing_files,
                          **{k: v for k, v in missing.as_dict().items()}},
        "encoding": decoder.summary(), **extra})
    return {sp: self._generate_examples(v, chosen, label_of) for sp, v in by_split.items()
            if v}

  def _generate_examples(self, kept_studies, chosen, label_of) -> Iterator[tuple[str, dict]]:
    del chosen
    for r in kept_studies:
      yield r.study, cxr.record(image=b"", view="", id=r.study, study=r.study,
                                patient=r.patient, labels=label_of.get(r.study, ()),
                                **r.sections())


class MimicCxr(MimicCxrText):
  """MIMIC-CXR-JPG images with their reports, one record per image (data_prep/cxr_reports.py)."""

  name = "mimic_cxr"
  TEXT_ONLY = False
  MANUAL_DOWNLOAD_INSTRUCTIONS = MIMIC_CXR_INSTRUCTIONS
  CONFIG_CLASS = MimicCxrConfig
  VIEWS_FN = staticmethod(_mimic_views)
  BUILDER_CONFIGS = [MimicCxrConfig(
      name="default", description="AP and PA views, studies with findings and impression, "
      "official split, JPEG bytes as released.")]
  NEEDS_LABELS = True

  def __init__(self, *, views: Sequence[str] | None = None, max_side: int | None = None,
               missing_files: str | None = None, require: str | None = None,
               encoding_errors: str | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of MimicCxrConfig (None: the default's)."""
    kwargs = self._configured(kwargs, views=views, max_side=max_side,
                              missing_files=missing_files, require=require,
                              encoding_errors=encoding_errors)
    _CxrBuilder.__init__(self, **kwargs)

  def _read_tables(self, root, decoder):
    studies, names, labels, chexpert = super()._read_tables(root, decoder)
    read_mimic_views(_table_path(root, MIMIC_METADATA, self.MANUAL_DOWNLOAD_INSTRUCTIONS),
                     studies, decoder)
    return studies, names, labels, chexpert

  def _select_images(self, root, study, missing):
    kept = []
    for dicom, view in study.dicoms:
      if view not in self.options.views:
        continue
      path = os.path.join(root, "files", f"p{study.subject[:2]}", f"p{study.subject}",
                          f"s{study.study}", f"{dicom}.jpg")
      if not os.path.isfile(path):
        if self.options.missing_files == "error":
          raise MissingFileError(
              f"{path}: image {dicom} of study {study.study} ({study.where}) is not in the "
              "image folder (build with the option missing_files=skip to leave such images "
              "out, counted)")
        missing.add("images", path)
        continue
      kept.append((dicom, view, path))
    return kept

  def _summary_extra(self) -> dict:
    return {"views": list(self.options.views), "max_side": self.options.max_side,
            "image_format": ("JPEG as released" if not self.options.max_side else
                             f"JPEG as released, or PNG when shrunk to <= "
                             f"{self.options.max_side} px")}

  def _generate_examples(self, kept_studies, chosen, label_of) -> Iterator[tuple[str, dict]]:
    max_side = self.options.max_side
    items = [(r, dicom, view, path) for r in kept_studies
             for dicom, view, path in chosen[r.study]]

    def encode(item):
      r, dicom, view, path = item
      with open(path, "rb") as f:
        data = f.read()
      try:
        with Image.open(io.BytesIO(data)) as im:
          size = im.size
      except Exception as e:  # pylint: disable=broad-except
        raise ReportFormatError(f"{path}: not a readable image: {e}") from e
      if max_side and max(size) > max_side:
        data = images.encode_png(readers.downsize(readers.to_grey(readers.read_image(path)),
                                                  max_side))
      key = f"{r.study}/{dicom}"
      return key, cxr.record(image=data, view=view, id=key, study=r.study,
                             patient=r.patient, labels=label_of[r.study], **r.sections())

    yield from image_folder.ordered_map(encode, items)
