"""Radiology report text of hybridmed: reading, sectioning and normalising chest X-ray reports.

HybridMED treats two sections of a report differently (the impression aligns with the global
image vector, the findings with its tokens; the impression is generated from the findings);
INDICATION and COMPARISON are kept aside. This module turns the releases' reports into
`Report`s with those four sections as normalised text ('' where the report lacks one), for
the chest X-ray builders (data_prep/cxr_reports.py) and for inspection.

Normalisation (`normalise`), applied to every section:
  * de-identification placeholders become the one token `tokenizer.DEID` ('[DEID]'), always
    as a separate word (a space on each side, so 'x-XXXX.' -> 'x- [DEID] .'):
      IU X-ray:  a run of four or more capital X ('XXXX'), also inside a word ('x-XXXX',
                 'ComparisXXXX', '53XXXX'); the run is one placeholder per four X (IU writes
                 'XXXX' per removed word, and two glued together make 'XXXXXXXX'), at least one.
                 Fewer than four X, and lower-case x, are left alone.
      MIMIC-CXR: a run of three or more underscores ('___'), one placeholder per three, at
                 least one; except a line holding only underscores (ten or more), which is
                 MIMIC-CXR's delimiter between an addendum and the report and is dropped.
    '[DEID]' already in the text stays as it is.
  * whitespace (any run of spaces, tabs, newlines, non-breaking spaces) becomes one space;
    the text is stripped. Nothing else changes: case, punctuation and numbers are the
    report's (the tokenizer lower-cases).

Decoding (`Decoder`): reports are UTF-8 (an XML file may declare another encoding, which is
then used). A byte sequence that is not valid is an error (`ReportFormatError`) naming the
file or archive member, the byte offset and the line, by default (`encoding_errors='strict'`):
a mis-encoded release should be noticed, not silently changed. With
`encoding_errors='replace'` each invalid sequence becomes U+FFFD (Python's 'replace': one
character per maximal invalid sequence) and is counted; the builders expose this as a builder
option and record the count and the files in their build summary.

Sources:
  * Open-i IU X-ray XML (`read_openi_xml`, `read_openi`): one `ecgen-radiology/<n>.xml` per
    report: `<AbstractText Label="FINDINGS|IMPRESSION|INDICATION|COMPARISON">`, image links
    `<parentImage id="CXR<n>_IM-....">` (the PNG `NLMCXR_png/<id>.png`), MeSH terms
    `<MeSH><major>` (manual; also `<minor>` if present) and `<automatic>` (MTI's). The study is
    <n> (checked against `<uId id="CXR<n>">`). `NLMCXR_reports.tgz` is read in memory
    (no extraction), or an extracted `ecgen-radiology/` folder. The XML gives no projection.
  * IU X-ray CSV export (Kaggle 'chest-xrays-indiana-university'; `read_iu_csv`):
    `indiana_reports.csv` (uid, MeSH, Problems, image, indication, comparison, findings,
    impression; MeSH and Problems ';'-separated) and `indiana_projections.csv`
    (uid, filename, projection Frontal/Lateral). `openi_filename` maps an Open-i image id to
    the export's file name ('CXR1_1_IM-0001-3001' -> '1_IM-0001-3001.dcm.png').
    On the project's copy the two agree wherever they overlap (`compare_reports`): the XML
    has 3,955 reports, the CSV the 3,851 that have images; findings, impression and
    comparison are identical after normalisation; 3 indications are '#NAME?' in the CSV (a
    spreadsheet's damage to texts starting '+' or '-'); 4 images of 3 reports linked in the
    XML are absent from the projections table.
  * MIMIC-CXR free-text reports (`split_sections`, `read_mimic_report`): see `split_sections`
    for the section conventions (those of MIT-LCP/mimic-cxr txt/section_parser.py and
    create_section_files.py, re-implemented).

IU X-ray has no patient ids: `read_openi` / `read_iu_csv` set patient = study.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import tarfile
from typing import Iterable, Iterator, Mapping, Sequence
import xml.etree.ElementTree as ET

from medguide_jax.data import tokenizer as tokenizer_lib

SECTIONS = ("findings", "impression", "indication", "comparison")
ENCODING_ERRORS = ("strict", "replace")
LISTED = 50   # files named in a summary (all are counted)


class ReportFormatError(ValueError):
  """A report or report table that cannot be read as expected; the message names the file
  (and the archive member, line, byte offset or field)."""


# ---------------------------------------------------------------------------------------------
# Normalisation

_DELIMITER_LINE = re.compile(r"(?m)^[ \t]*_{10,}[ \t]*$")
_IU_PLACEHOLDER = re.compile(r"X{4,}")
_MIMIC_PLACEHOLDER = re.compile(r"_{3,}")
_SPACE = re.compile(r"\s+")


def _deid(run_length: int, per: int) -> str:
  return " " + " ".join([tokenizer_lib.DEID] * max(1, run_length // per)) + " "


def normalise(text: str | None) -> str:
  """`text` with de-identification placeholders as [DEID] and whitespace collapsed (see the
  module docstring for exactly what is replaced); '' for None or blank text."""
  if not text:
    return ""
  text = _DELIMITER_LINE.sub("\n", str(text))
  text = _IU_PLACEHOLDER.sub(lambda m: _deid(len(m.group()), 4), text)
  text = _MIMIC_PLACEHOLDER.sub(lambda m: _deid(len(m.group()), 3), text)
  return _SPACE.sub(" ", text).strip()


# ---------------------------------------------------------------------------------------------
# Decoding


class Decoder:
  """Bytes -> text with the policy of `encoding_errors` (module docstring), counting the
  replacements: `replaced` characters in `files` (the first LISTED named)."""

  def __init__(self, encoding_errors: str = "strict"):
    if encoding_errors not in ENCODING_ERRORS:
      raise ValueError(f"encoding_errors={encoding_errors!r}: use one of {ENCODING_ERRORS}")
    self.errors = encoding_errors
    self.replaced = 0
    self.files_count = 0
    self.files: list[str] = []

  def __call__(self, raw: bytes, where: str, encoding: str = "utf-8") -> str:
    try:
      text = raw.decode(encoding)
    except LookupError as e:
      raise ReportFormatError(f"{where}: unknown text encoding {encoding!r}") from e
    except UnicodeDecodeError as e:
      if self.errors == "strict":
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start:e.end].hex(" ")
        raise ReportFormatError(
            f"{where}: byte offset {e.start} (line {line}): bytes {bad} are not valid "
            f"{encoding} ({e.reason}); fix the file, or build with the option "
            "encoding_errors=replace to replace such bytes with U+FFFD (counted in the "
            "build summary)") from e
      text = raw.decode(encoding, "replace")
      n = text.count("\ufffd") - raw.decode(encoding, "ignore").count("\ufffd")
      self.replaced += n
      self.files_count += 1
      if len(self.files) < LISTED:
        self.files.append(where)
    if text.startswith("\ufeff"):
      text = text[1:]
    return text

  def summary(self) -> dict:
    return {"encoding_errors": self.errors, "replaced_characters": self.replaced,
            "files_with_replacements": self.files_count, "files": list(self.files)}


# ---------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass
class Report:
  """One study's report: the four sections (normalised; '' when absent) and what the release
  says beside them."""
  study: str
  patient: str
  findings: str = ""
  impression: str = ""
  indication: str = ""
  comparison: str = ""
  # (image file name or id, view upper case: 'FRONTAL', 'PA', ...; '' where unknown)
  images: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  mesh: tuple[str, ...] = ()            # IU: MeSH terms (XML <major>/<minor>; CSV 'MeSH')
  mesh_automatic: tuple[str, ...] = ()  # IU XML <automatic> (MTI) terms
  problems: tuple[str, ...] = ()        # IU: CSV 'Problems' (XML: each MeSH term's head)
  where: str = ""                       # the file / member / CSV line it came from
  convention: str = ""                  # how the sections were found (labelled, headers, ...)

  def lacking(self) -> list[str]:
    """Which of findings, impression the report lacks."""
    return [s for s in ("findings", "impression") if not getattr(self, s)]

  def sections(self) -> dict[str, str]:
    return {s: getattr(self, s) for s in SECTIONS}


# ---------------------------------------------------------------------------------------------
# Open-i XML

OPENI_TGZ = "NLMCXR_reports.tgz"
OPENI_FOLDER = "ecgen-radiology"
_OPENI_LABELS = {"FINDINGS": "findings", "IMPRESSION": "impression",
                 "INDICATION": "indication", "COMPARISON": "comparison"}
_XML_NAME = re.compile(r"^(\d+)\.xml$")
_XML_DECL = re.compile(rb"^\s*<\?xml[^>]*encoding\s*=\s*['\"]([A-Za-z0-9._-]+)['\"]")
_OPENI_ID = re.compile(r"^CXR(\d+)_(?:\d+_)?(.+)$")


def _decode_xml(raw: bytes, where: str, decoder: Decoder) -> str:
  m = _XML_DECL.match(raw[:200])
  text = decoder(raw, where, m.group(1).decode() if m else "utf-8")
  # The declaration names the byte encoding, which a str no longer has.
  return re.sub(r"^\s*<\?xml[^>]*\?>", "", text, count=1)


def _text(element) -> str:
  return "".join(element.itertext()) if element is not None else ""


def read_openi_xml(raw: bytes, where: str, *, study: str | None = None,
                   decoder: Decoder | None = None) -> Report:
  """One Open-i report from its XML bytes. `study`: the number of its file name, checked
  against <uId id="CXR<n>"> when both are there (else taken from it).

  Errors (naming `where`): bytes that do not decode, XML that does not parse (line and
  column), a root other than eCitation, no study number, an AbstractText label other than
  FINDINGS / IMPRESSION / INDICATION / COMPARISON or given twice, a parentImage without id
  or given twice.
  """
  decoder = decoder or Decoder()
  text = _decode_xml(raw, where, decoder)
  try:
    root = ET.fromstring(text)
  except ET.ParseError as e:
    line, column = e.position
    raise ReportFormatError(f"{where}: not well-formed XML at line {line}, column {column}: "
                            f"{e}") from e
  if root.tag != "eCitation":
    raise ReportFormatError(f"{where}: root element <{root.tag}>, expected <eCitation> (an "
                            "Open-i ecgen-radiology report)")
  uid = root.find("uId")
  uid = (uid.get("id") or "") if uid is not None else ""
  from_uid = uid[3:] if uid.startswith("CXR") else ""
  if study is not None and from_uid and from_uid != study:
    raise ReportFormatError(f"{where}: <uId id={uid!r}> but the file name says report "
                            f"{study}")
  study = study or from_uid
  if not study:
    raise ReportFormatError(f"{where}: no report number (file name <n>.xml or <uId id="
                            "\"CXR<n>\">)")
  sections = {}
  for element in root.iter("AbstractText"):
    label = (element.get("Label") or "").strip().upper()
    if label not in _OPENI_LABELS:
      raise ReportFormatError(f"{where}: <AbstractText Label={label!r}>; expected one of "
                              f"{sorted(_OPENI_LABELS)}")
    name = _OPENI_LABELS[label]
    if name in sections:
      raise ReportFormatError(f"{where}: two <AbstractText Label={label!r}> elements")
    sections[name] = normalise(_text(element))
  images = []
  for element in root.iter("parentImage"):
    image_id = (element.get("id") or "").strip()
    if not image_id:
      raise ReportFormatError(f"{where}: a <parentImage> without an id attribute")
    if any(image_id == i for i, _ in images):
      raise ReportFormatError(f"{where}: <parentImage id={image_id!r}> given twice")
    images.append((image_id, ""))
  mesh, automatic = [], []
  for block in root.iter("MeSH"):
    for child in block:
      term = " ".join(_text(child).split())
      if term:
        (automatic if child.tag == "automatic" else mesh).append(term)
  return Report(study=study, patient=study, images=images, mesh=tuple(mesh),
                mesh_automatic=tuple(automatic),
                problems=tuple(t.split("/")[0] for t in mesh), where=where,
                convention="labelled", **sections)


def _openi_member_study(name: str, where: str) -> str | None:
  """The report number of an archive member or file name '<...>/<n>.xml'; None for files
  that are not reports (folders, dot files, macOS '._' copies, non-XML)."""
  base = name.rstrip("/").split("/")[-1]
  if not base.lower().endswith(".xml") or base.startswith("."):
    return None
  m = _XML_NAME.match(base)
  if not m:
    raise ReportFormatError(f"{where}: an XML file not named <report number>.xml")
  return str(int(m.group(1)))


def read_openi(path: str, *, decoder: Decoder | None = None) -> list[Report]:
  """Every report of NLMCXR_reports.tgz (read in memory) or of an extracted
  ecgen-radiology/ folder, sorted by report number.

  Errors name the archive (and member) or file: unreadable, no report in it, two files of
  one report number, and those of `read_openi_xml`.
  """
  decoder = decoder or Decoder()
  found: dict[str, Report] = {}

  def add(study, raw, where):
    if study in found:
      raise ReportFormatError(f"{where}: report {study} also in {found[study].where}")
    found[study] = read_openi_xml(raw, where, study=study, decoder=decoder)

  if os.path.isdir(path):
    for dirpath, dirs, files in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(files):
        full = os.path.join(dirpath, name)
        study = _openi_member_study(name, full)
        if study is not None:
          with open(full, "rb") as f:
            add(study, f.read(), full)
  else:
    try:
      archive = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as e:
      raise ReportFormatError(f"{path} cannot be read as a tar archive: {e}") from e
    with archive:
      try:
        for member in archive:
          if not member.isfile():
            continue
          where = f"{path}: member {member.name}"
          study = _openi_member_study(member.name, where)
          if study is None:
            continue
          add(study, archive.extractfile(member).read(), where)
      except (OSError, tarfile.TarError, EOFError) as e:
        raise ReportFormatError(f"{path} cannot be read (truncated or corrupt?): {e}") from e
  if not found:
    raise ReportFormatError(f"{path}: no report (<n>.xml) in it")
  return [found[k] for k in sorted(found, key=int)]


def openi_filename(image_id: str, study: str) -> str | None:
  """The IU CSV export's file name of an Open-i image id ('CXR1_1_IM-0001-3001' of report 1
  -> '1_IM-0001-3001.dcm.png'; 'CXR2_IM-0652-1001' -> '2_IM-0652-1001.dcm.png'); None when
  the id does not have that form or names another report."""
  m = _OPENI_ID.match(image_id)
  if not m or str(int(m.group(1))) != str(study):
    return None
  return f"{study}_{m.group(2)}.dcm.png"


# ---------------------------------------------------------------------------------------------
# IU X-ray CSV export

IU_REPORTS_CSV = "indiana_reports.csv"
IU_PROJECTIONS_CSV = "indiana_projections.csv"
_IU_COLUMNS = ("uid", "findings", "impression")
_PROJECTION_COLUMNS = ("uid", "filename", "projection")


def read_csv_rows(path: str, required: Sequence[str], *, decoder: Decoder | None = None,
                  raw: bytes | None = None) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, row) of a CSV file (or of its `raw` bytes), values stripped, after
  checking the `required` columns (an error naming the file and the columns)."""
  decoder = decoder or Decoder()
  if raw is None:
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise ReportFormatError(f"{path} cannot be read: {e}") from e
  text = decoder(raw, path)
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = [c.strip() for c in next(reader)]
  except StopIteration:
    raise ReportFormatError(f"{path}: empty file (expected a header with columns "
                            f"{list(required)})") from None
  missing = [c for c in required if c not in header]
  if missing:
    raise ReportFormatError(f"{path}: missing columns {missing}; found {header}")
  line = reader.line_num + 1
  try:
    for values in reader:
      if values:
        if len(values) > len(header):
          raise ReportFormatError(f"{path} line {line}: {len(values)} fields, the header has "
                                  f"{len(header)}")
        yield line, {k: (values[i].strip() if i < len(values) else "")
                     for i, k in enumerate(header)}
      line = reader.line_num + 1
  except csv.Error as e:
    raise ReportFormatError(f"{path} line {line}: {e}") from e


def _tags(value: str) -> tuple[str, ...]:
  return tuple(" ".join(t.split()) for t in value.split(";") if t.strip())


def read_iu_projections(path: str, *, decoder: Decoder | None = None
                        ) -> dict[str, list[tuple[str, str]]]:
  """uid -> [(file name, projection upper case)] of indiana_projections.csv, in file order.
  Errors name the file and line: an empty uid or file name, a file name listed twice."""
  out: dict[str, list[tuple[str, str]]] = {}
  seen: dict[str, int] = {}
  for line, row in read_csv_rows(path, _PROJECTION_COLUMNS, decoder=decoder):
    where = f"{path} line {line}"
    if not row["uid"] or not row["filename"]:
      raise ReportFormatError(f"{where}: empty uid or filename")
    if row["filename"] in seen:
      raise ReportFormatError(f"{where}: filename {row['filename']!r} already on line "
                              f"{seen[row['filename']]}")
    seen[row["filename"]] = line
    out.setdefault(row["uid"], []).append((row["filename"], row["projection"].upper()))
  return out


def read_iu_csv(reports_csv: str, projections_csv: str | None = None, *,
                decoder: Decoder | None = None) -> list[Report]:
  """The reports of indiana_reports.csv in file order, with their images (file name and
  projection) from indiana_projections.csv when given.

  Errors name the file and line: missing columns, an empty or repeated uid, a projections
  row whose uid has no report.
  """
  decoder = decoder or Decoder()
  reports, lines = [], {}
  for line, row in read_csv_rows(reports_csv, _IU_COLUMNS, decoder=decoder):
    where = f"{reports_csv} line {line}"
    uid = row["uid"]
    if not uid:
      raise ReportFormatError(f"{where}: empty uid")
    if uid in lines:
      raise ReportFormatError(f"{where}: uid {uid!r} already on line {lines[uid]}")
    lines[uid] = line
    mesh = _tags(row.get("MeSH", ""))
    reports.append(Report(
        study=uid, patient=uid, where=where, convention="labelled", mesh=mesh,
        problems=_tags(row.get("Problems", "")),
        **{s: normalise(row.get(s, "")) for s in SECTIONS}))
  if projections_csv is not None:
    images = read_iu_projections(projections_csv, decoder=decoder)
    unknown = sorted(set(images) - set(lines))
    if unknown:
      raise ReportFormatError(f"{projections_csv}: uids {unknown[:10]} ({len(unknown)}) have "
                              f"no report in {reports_csv}")
    for r in reports:
      r.images = list(images.get(r.study, []))
  return reports


def compare_reports(first: Iterable[Report], second: Iterable[Report]) -> dict:
  """How two readings of one release differ (e.g. the Open-i XML and the CSV export):
  studies only in either, and per section the studies whose text differs (up to LISTED
  named, all counted)."""
  a = {r.study: r for r in first}
  b = {r.study: r for r in second}
  both = sorted(set(a) & set(b), key=lambda s: (len(s), s))
  differ = {}
  for section in SECTIONS:
    studies = [s for s in both if getattr(a[s], section) != getattr(b[s], section)]
    differ[section] = {"count": len(studies), "studies": studies[:LISTED]}
  return {"common": len(both), "only_first": sorted(set(a) - set(b), key=lambda s: (len(s), s)),
          "only_second": sorted(set(b) - set(a), key=lambda s: (len(s), s)), "differ": differ}


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR free-text reports

# Header names -> the section they are (MIMIC-CXR's published normalisation: the frequent
# headers, their alternate names and misspellings seen in the release).
SECTION_ALIASES = {
    "impression": "impression", "conclusion": "impression", "conclusions": "impression",
    "findings and impression": "impression", "findings/impression": "impression",
    "findings/ impression": "impression", "impressions": "impression",
    "impresson": "impression", "imprression": "impression", "imoression": "impression",
    "impressoin": "impression", "imprssion": "impression", "impresion": "impression",
    "imperssion": "impression", "mpression": "impression", "impession": "impression",
    "findings": "findings", "finding": "findings", "findins": "findings",
    "findindgs": "findings", "findgings": "findings", "findngs": "findings",
    "findnings": "findings", "finidngs": "findings", "reference findings": "findings",
    "chest, two views": "findings",
    "indication": "indication", "indications": "indication", "idication": "indication",
    "ndication": "indication", "reason for examination": "indication",
    "reason for exam": "indication", "clinical indication": "indication",
    "comparison": "comparison", "comparisons": "comparison", "comparision": "comparison",
    "comparsion": "comparison", "comparrison": "comparison", "comparisions": "comparison",
    "reference exam": "comparison", "comparison exam": "comparison",
    "comparison film": "comparison",
    "history": "history", "clinical history": "history", "clinical information": "history",
    "patient history": "history", "pfi": "history",
    "examination": "examination", "exam": "examination", "type of examination": "examination",
    "technique": "technique", "notification": "notification",
    "recommendation(s)": "recommendations", "recommendations": "recommendations",
    "recommendation": "recommendations", "addendum": "addendum", "date": "date",
    "comment": "comment", "comments": "comment", "wet read": "wet read",
    "wetread": "wet read", "final report": "final report",
}
# A header containing one of these words is that section (in this order).
_MAIN_WORDS = ("impression", "findings", "history", "comparison", "addendum")
# A header that describes the views of the study ('PA AND LATERAL VIEWS OF THE CHEST:') is a
# findings section.
_FINDINGS_LIKE = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    r"two views|frontal view|pa view|ap view|one view|lateral view|bone window|"
    r"frontal upright|frontal semi-upright|ribs|pa and lat")
# A header: at a line start, a name (letters, spaces, ( ) / , & -; up to 60 characters),
# optional spaces, ':'. Capitalised names are headers (MIMIC-CXR's convention); names in
# other case only when they are a known section name (SECTION_ALIASES), so 'Lungs: clear'
# in running text stays text.
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ()/,&-]{0,59}?)[ \t]*:(?=[\s_]|$)", re.M)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
CONVENTIONS = ("headers", "last_paragraph", "comparison", "none")


def section_name(header: str) -> str:
  """The section a header names: 'findings', 'impression', 'indication', 'comparison',
  'history', ... (SECTION_ALIASES, then the main words it contains, then a view description
  = findings), else the header itself lower-cased ('other' sections)."""
  name = " ".join(header.lower().split())
  if name in SECTION_ALIASES:
    return SECTION_ALIASES[name]
  for word in _MAIN_WORDS:
    if word in name:
      return word
  if _FINDINGS_LIKE.search(name):
    return "findings"
  return name


@dataclasses.dataclass
class Sections:
  """The sections of a free-text report (normalised text, '' when absent), the convention
  that found findings / impression (CONVENTIONS), and the headers read, in order, as
  (header as written, section)."""
  findings: str = ""
  impression: str = ""
  indication: str = ""
  comparison: str = ""
  convention: str = "none"
  headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _is_header(name: str) -> bool:
  letters = [c for c in name if c.isalpha()]
  if letters and all(c.isupper() for c in letters):
    return True
  return " ".join(name.lower().split()) in SECTION_ALIASES


def split_sections(text: str) -> Sections:
  """The four sections of a MIMIC-CXR style free-text report.

  Conventions (MIMIC-CXR's section parser, MIT-LCP/mimic-cxr txt/section_parser.py and
  create_section_files.py; re-implemented, with the differences said):
    * A header is a name at the start of a line followed by ':' (`_HEADER`): in capitals
      ('FINDINGS:', 'PA AND LATERAL VIEWS OF THE CHEST:'), or a known section name in any
      case and spacing ('Impression :'), which MIMIC-CXR's parser (capitals only) misses.
      The text before the first header is the preamble ('FINAL REPORT'); a section runs to
      the next header. A line of underscores (the addendum delimiter) is a paragraph break.
    * Header names map to sections by `section_name`: e.g. CONCLUSION, FINDINGS AND
      IMPRESSION, FINDINGS/IMPRESSION are the impression; REASON FOR EXAM(INATION), CLINICAL
      INDICATION the indication; REFERENCE EXAM, COMPARISONS the comparison; a view
      description (CHEST, TWO VIEWS; PORTABLE AP ...) the findings; misspellings too.
    * Empty findings / impression sections are dropped; of several sections of one kind the
      LAST non-empty one is taken (as create_section_files.py does).
    * An 'other' header (not a known section, e.g. 'LUNGS:', 'HEART:') right after the
      findings or the impression is a subheading of it, and so is a second findings
      (impression) header right after a findings (impression) section: its header and
      text are appended to that section (MIMIC-CXR's parser would cut the section there,
      keeping only the last part); after an empty one it simply starts the section.
    * indication: the INDICATION section, else the HISTORY one.
  Convention that applied (`Sections.convention`):
    'headers'         findings and/or impression found under their headers;
    'last_paragraph'  neither: the paragraphs after the first of the last section (of the
                      whole text when there is no header) are the impression, the first
                      stays where it was (MIMIC-CXR's 'last_paragraph');
    'comparison'      neither, and the last section has one paragraph, but there is a
                      COMPARISON section: create_section_files.py takes it as the report's
                      conclusion ("the radiologist has usually written the report in the
                      comparison section"): it becomes the impression, comparison is '';
    'none'            nothing usable: findings and impression are ''.
  Not applied: create_section_files.py's per-study hand fixes of about 30 MIMIC-CXR reports
  (custom_mimic_cxr_rules); those studies get the general rules.
  """
  text = _DELIMITER_LINE.sub("\n", str(text).replace("\r\n", "\n").replace("\r", "\n"))
  matches = [m for m in _HEADER.finditer(text) if _is_header(m.group(1))]
  preamble = text[:matches[0].start()] if matches else text
  parts: list[list] = []   # [header, section, text]
  for i, m in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
    parts.append([m.group(1).strip(), section_name(m.group(1)), text[m.end():end]])
  out = Sections(headers=[(h, s) for h, s, _ in parts])
  # Subheadings of findings / impression, and a section of one of them right after one of
  # the same kind (FINDINGS: ... PA AND LATERAL VIEWS OF THE CHEST: ...), are one section.
  merged: list[list] = []
  for header, name, body in parts:
    known = (name in SECTION_ALIASES.values() or name in _MAIN_WORDS)
    previous = merged[-1] if merged else None
    if previous and previous[1] in ("findings", "impression") and (
        not known or name == previous[1]):
      if name == previous[1] and not normalise(previous[2]):
        previous[0], previous[2] = header, body   # an empty header line, then the section
      else:
        previous[2] += f"\n{header}: {body}"
    else:
      merged.append([header, name, body])
  merged = [p for p in merged
            if not (p[1] in ("findings", "impression") and not normalise(p[2]))]

  def last(name: str) -> int | None:
    for i in range(len(merged) - 1, -1, -1):
      if merged[i][1] == name and normalise(merged[i][2]):
        return i
    return None

  def get(name: str) -> str:
    i = last(name)
    return normalise(merged[i][2]) if i is not None else ""

  out.findings, out.impression = get("findings"), get("impression")
  if out.findings or out.impression:
    out.convention = "headers"
  else:
    body = merged[-1][2] if merged else preamble
    paragraphs = [p for p in _PARAGRAPH.split(body.strip("\n")) if p.strip()]
    if len(paragraphs) > 1:
      out.impression = normalise("\n\n".join(paragraphs[1:]))
      out.convention = "last_paragraph"
      if merged:
        merged[-1][2] = paragraphs[0]
    elif last("comparison") is not None:
      out.impression = get("comparison")
      out.convention = "comparison"
      merged = [p for p in merged if p[1] != "comparison"]
  out.indication = get("indication") or get("history")
  out.comparison = get("comparison")
  return out


def read_mimic_report(raw: bytes, where: str, *, study: str, patient: str,
                      decoder: Decoder | None = None) -> Report:
  """A MIMIC-CXR report file's sections (`split_sections`) as a Report."""
  decoder = decoder or Decoder()
  parts = split_sections(decoder(raw, where))
  return Report(study=study, patient=patient, findings=parts.findings,
                impression=parts.impression, indication=parts.indication,
                comparison=parts.comparison, where=where, convention=parts.convention)


def lacking_counts(reports: Iterable[Report]) -> Mapping[str, int]:
  """How many reports lack each of findings, impression."""
  counts = {"findings": 0, "impression": 0}
  for r in reports:
    for s in r.lacking():
      counts[s] += 1
  return counts
