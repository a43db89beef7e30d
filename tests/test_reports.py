"""Report text handling (medguide_jax/data/reports.py): normalisation, decoding, Open-i XML,
the IU CSV export, MIMIC-CXR sectioning; and the project's real IU X-ray reports
(../shared/data/cxr_iu_xray_reports, MEDGUIDE_SHARED_DATA), XML against CSV."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from medguide_jax.data import reports
from medguide_jax.data import tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
IU_DIR = os.path.join(SHARED, "cxr_iu_xray_reports")
D = tokenizer.DEID


# ---------------------------------------------------------------------------------------------
# normalise


@pytest.mark.parametrize("text, want", [
    ("Normal chest x-XXXX.", f"Normal chest x- {D} ."),
    ("There are no XXXX of a pleural effusion.", f"There are no {D} of a pleural effusion."),
    ("Inferior XXXX XXXX XXXX.", f"Inferior {D} {D} {D} ."),
    ("ComparisXXXXXXXX", f"Comparis {D} {D}"),         # two glued placeholders
    ("53XXXX-year-old", f"53 {D} -year-old"),
    ("XXX and xxxx and XX stay", "XXX and xxxx and XX stay"),
    ("___ year old woman", f"{D} year old woman"),
    ("dated ___-___", f"dated {D} - {D}"),
    ("______", f"{D} {D}"),
    ("before\n ______________________________\n after", "before after"),  # MIMIC delimiter
    ("  two\n\tlines \u00a0 here  ", "two lines here"),
    (f"kept {D} as is", f"kept {D} as is"),
    ("", ""), (None, ""), ("   \n ", ""),
])
def test_normalise(text, want):
  assert reports.normalise(text) == want


def test_deid_is_one_token():
  tok = tokenizer.ReportTokenizer(tokenizer.train(
      [reports.normalise("Normal chest x-XXXX. No XXXX effusion.")] * 3))
  assert tok.tokens(reports.normalise("chest x-XXXX.")).count(D) == 1


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decoder_strict_names_file_offset_and_line():
  with pytest.raises(reports.ReportFormatError, match=r"a\.txt: byte offset 8 \(line 2\)"):
    reports.Decoder()(b"line 1\nx\xffy", "a.txt")


def test_decoder_replace_counts():
  decoder = reports.Decoder("replace")
  text = decoder(b"ok \xff\xfe and \xef\xbf\xbd and \xc3", "b.txt")
  # Python's 'replace': one U+FFFD per invalid sequence (here each byte), and the real one
  assert text == "ok \ufffd\ufffd and \ufffd and \ufffd"
  assert decoder.replaced == 3 and decoder.files == ["b.txt"]
  assert decoder(b"clean", "c.txt") == "clean" and decoder.files_count == 1
  assert decoder.summary()["replaced_characters"] == 3


def test_decoder_rejects_unknown_policy():
  with pytest.raises(ValueError, match="encoding_errors"):
    reports.Decoder("ignore")


# ---------------------------------------------------------------------------------------------
# Open-i XML

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <uId id="CXR{n}"/>
   <MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText>
      <AbstractText Label="INDICATION">Positive TB test</AbstractText>
      <AbstractText Label="FINDINGS">{findings}</AbstractText>
      <AbstractText Label="IMPRESSION">{impression}</AbstractText>
   </Abstract></Article></MedlineCitation>
   <MeSH><major>Cardiomegaly/borderline</major><major>Pulmonary Artery/enlarged</major>
      <automatic>opacity</automatic></MeSH>
   <parentImage id="CXR{n}_1_IM-0001-3001"><caption>Xray Chest PA and Lateral</caption>
   </parentImage>
   <parentImage id="CXR{n}_IM-0001-4001"/>
</eCitation>"""


def openi_xml(n, findings="The heart is normal. No XXXX effusion.", impression="Normal."):
  return XML.format(n=n, findings=findings, impression=impression).encode()


def test_read_openi_xml():
  r = reports.read_openi_xml(openi_xml(7), "7.xml", study="7")
  assert (r.study, r.patient) == ("7", "7")
  assert r.findings == f"The heart is normal. No {D} effusion."
  assert (r.impression, r.indication, r.comparison) == ("Normal.", "Positive TB test", "None.")
  assert r.images == [("CXR7_1_IM-0001-3001", ""), ("CXR7_IM-0001-4001", "")]
  assert r.mesh == ("Cardiomegaly/borderline", "Pulmonary Artery/enlarged")
  assert r.problems == ("Cardiomegaly", "Pulmonary Artery")
  assert r.mesh_automatic == ("opacity",)
  assert r.lacking() == []
  empty = reports.read_openi_xml(openi_xml(8, findings="", impression=" "), "8.xml")
  assert empty.study == "8" and empty.lacking() == ["findings", "impression"]


@pytest.mark.parametrize("raw, match", [
    (b"<eCitation><uId id='CXR1'/>", r"x\.xml: not well-formed XML at line 1"),
    (b"<other/>", r"x\.xml: root element <other>"),
    (b"<eCitation><uId id='CXR2'/></eCitation>", r"x\.xml: <uId id='CXR2'> but the file"),
    (b"<eCitation><AbstractText Label='NOTE'>a</AbstractText></eCitation>",
     r"x\.xml: <AbstractText Label='NOTE'>"),
    (b"<eCitation><AbstractText Label='FINDINGS'>a</AbstractText>"
     b"<AbstractText Label='FINDINGS'>b</AbstractText></eCitation>", "two <AbstractText"),
    (b"<eCitation><parentImage/></eCitation>", "without an id"),
    (b"<eCitation><parentImage id='a'/><parentImage id='a'/></eCitation>", "given twice"),
    (b"<eCitation>caf\xe9</eCitation>", r"x\.xml: byte offset 14"),
])
def test_read_openi_xml_errors(raw, match):
  with pytest.raises(reports.ReportFormatError, match=match):
    reports.read_openi_xml(raw, "x.xml", study="1")


def test_read_openi_declared_encoding():
  raw = (b'<?xml version="1.0" encoding="iso-8859-1"?><eCitation>'
         b'<AbstractText Label="FINDINGS">caf\xe9</AbstractText></eCitation>')
  assert reports.read_openi_xml(raw, "x.xml", study="1").findings == "caf\u00e9"


def _tgz(path, members):
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_read_openi_tgz_and_folder(tmp_path):
  members = {f"ecgen-radiology/{n}.xml": openi_xml(n) for n in (10, 2, 1)}
  members["ecgen-radiology/._1.xml"] = b"\x00mac"
  _tgz(tmp_path / "r.tgz", members)
  got = reports.read_openi(str(tmp_path / "r.tgz"))
  assert [r.study for r in got] == ["1", "2", "10"]
  assert got[0].where.endswith("r.tgz: member ecgen-radiology/1.xml")
  folder = tmp_path / "ecgen-radiology"
  folder.mkdir()
  for n in (3, 4):
    (folder / f"{n}.xml").write_bytes(openi_xml(n))
  assert [r.study for r in reports.read_openi(str(folder))] == ["3", "4"]


def test_read_openi_errors(tmp_path):
  _tgz(tmp_path / "dup.tgz", {"a/1.xml": openi_xml(1), "b/1.xml": openi_xml(1)})
  with pytest.raises(reports.ReportFormatError, match=r"member b/1\.xml: report 1 also in"):
    reports.read_openi(str(tmp_path / "dup.tgz"))
  _tgz(tmp_path / "empty.tgz", {"readme.txt": b"x"})
  with pytest.raises(reports.ReportFormatError, match=r"empty\.tgz: no report"):
    reports.read_openi(str(tmp_path / "empty.tgz"))
  _tgz(tmp_path / "name.tgz", {"ecgen-radiology/notes.xml": b"<a/>"})
  with pytest.raises(reports.ReportFormatError, match=r"member ecgen-radiology/notes\.xml"):
    reports.read_openi(str(tmp_path / "name.tgz"))
  (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
  with pytest.raises(reports.ReportFormatError, match=r"bad\.tgz cannot be read"):
    reports.read_openi(str(tmp_path / "bad.tgz"))


def test_openi_filename():
  assert reports.openi_filename("CXR1_1_IM-0001-3001", "1") == "1_IM-0001-3001.dcm.png"
  assert reports.openi_filename("CXR2_IM-0652-1001", "2") == "2_IM-0652-1001.dcm.png"
  assert reports.openi_filename("CXR3_IM-0652-1001", "2") is None
  assert reports.openi_filename("IM-0652-1001", "2") is None


# ---------------------------------------------------------------------------------------------
# IU CSV export

REPORTS_CSV = (
    "uid,MeSH,Problems,image,indication,comparison,findings,impression\n"
    '1,normal,normal,Xray,Positive TB test,None.,"The heart is normal.\nNo XXXX.",Normal.\n'
    '2,"Opacity/lung;Cardiomegaly",Opacity;Cardiomegaly,Xray,,,,"No acute disease."\n')
PROJECTIONS_CSV = ("uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n"
                   "1,1_IM-0001-3001.dcm.png,Lateral\n2,2_IM-0002-1001.dcm.png,Frontal\n")


def test_read_iu_csv(tmp_path):
  (tmp_path / "r.csv").write_text(REPORTS_CSV)
  (tmp_path / "p.csv").write_text(PROJECTIONS_CSV)
  a, b = reports.read_iu_csv(str(tmp_path / "r.csv"), str(tmp_path / "p.csv"))
  assert a.findings == f"The heart is normal. No {D} ."
  assert a.images == [("1_IM-0001-4001.dcm.png", "FRONTAL"),
                      ("1_IM-0001-3001.dcm.png", "LATERAL")]
  assert a.where.endswith("r.csv line 2") and b.where.endswith("r.csv line 4")
  assert b.lacking() == ["findings"] and b.mesh == ("Opacity/lung", "Cardiomegaly")
  assert reports.lacking_counts([a, b]) == {"findings": 1, "impression": 0}


def test_read_iu_csv_errors(tmp_path):
  path = tmp_path / "r.csv"
  path.write_text("uid,findings\n1,a\n")
  with pytest.raises(reports.ReportFormatError, match=r"r\.csv: missing columns \['impression'\]"):
    reports.read_iu_csv(str(path))
  path.write_text("uid,findings,impression\n1,a,b\n1,c,d\n")
  with pytest.raises(reports.ReportFormatError, match=r"r\.csv line 3: uid '1' already on line 2"):
    reports.read_iu_csv(str(path))
  path.write_bytes(b"uid,findings,impression\n1,caf\xe9,b\n")
  with pytest.raises(reports.ReportFormatError, match=r"r\.csv: byte offset 29 \(line 2\)"):
    reports.read_iu_csv(str(path))
  decoder = reports.Decoder("replace")
  assert reports.read_iu_csv(str(path), decoder=decoder)[0].findings == "caf\ufffd"
  assert decoder.replaced == 1
  path.write_text("uid,findings,impression\n1,a,b\n")
  (tmp_path / "p.csv").write_text("uid,filename,projection\n9,9_IM.png,Frontal\n")
  with pytest.raises(reports.ReportFormatError, match=r"p\.csv: uids \['9'\]"):
    reports.read_iu_csv(str(path), str(tmp_path / "p.csv"))
  with pytest.raises(reports.ReportFormatError, match=r"nothere\.csv cannot be read"):
    reports.read_iu_csv(str(tmp_path / "nothere.csv"))


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR sections

STANDARD = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___ year old woman with ?pleural effusion  // ?pleural effusion
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 Cardiac size cannot be evaluated.  Large left pleural effusion is new.  Small
 right effusion is new.  The upper lungs are clear.  There is no pneumothorax.
 
 IMPRESSION: 
 
 Large left pleural effusion
"""


def test_sections_standard_report():
  s = reports.split_sections(STANDARD)
  assert s.convention == "headers"
  assert s.findings == ("Cardiac size cannot be evaluated. Large left pleural effusion is "
                        "new. Small right effusion is new. The upper lungs are clear. There "
                        "is no pneumothorax.")
  assert s.impression == "Large left pleural effusion"
  assert s.indication == f"{D} year old woman with ?pleural effusion // ?pleural effusion"
  assert s.comparison == D
  assert [n for _, n in s.headers] == ["examination", "indication", "technique",
                                       "comparison", "findings", "impression"]


def test_sections_lowercase_and_odd_spacing():
  s = reports.split_sections("FINAL REPORT\nexamination : chest portable ap\n"
                             "  indication:___ with fever\ncomparison :   none.\n"
                             "findings:    lungs are clear.\n   no effusion.\n"
                             "   Impression  :  No acute process.\r\n")
  assert (s.findings, s.impression) == ("lungs are clear. no effusion.", "No acute process.")
  assert (s.indication, s.comparison, s.convention) == (f"{D} with fever", "none.", "headers")


def test_sections_running_text_is_not_a_header():
  s = reports.split_sections(" FINDINGS: Normal heart.\n Lungs: clear, no effusion.\n"
                             " The aorta: unremarkable at 10:30.\n IMPRESSION: Normal.")
  assert s.findings == ("Normal heart. Lungs: clear, no effusion. The aorta: unremarkable "
                        "at 10:30.")


def test_sections_report_lacking_findings_alternate_names():
  s = reports.split_sections(
      "                                 FINAL REPORT\n CHEST RADIOGRAPH\n \n"
      " REASON FOR EXAMINATION:  Evaluate for pneumonia.\n \n REFERENCE EXAM:  ___.\n \n"
      " IMPRESSON:  No pneumonia.\n")
  assert (s.findings, s.impression) == ("", "No pneumonia.")
  assert (s.indication, s.comparison, s.convention) == (
      "Evaluate for pneumonia.", f"{D} .", "headers")


@pytest.mark.parametrize("header, section", [
    ("CONCLUSION", "impression"), ("FINDINGS AND IMPRESSION", "impression"),
    ("FINDINGS/IMPRESSION", "impression"), ("IMPRESSIONS", "impression"),
    ("PA AND LATERAL VIEWS OF THE CHEST", "findings"), ("CHEST, TWO VIEWS", "findings"),
    ("PORTABLE AP CHEST", "findings"), ("FINIDNGS", "findings"),
    ("CLINICAL HISTORY", "history"), ("REASON FOR EXAM", "indication"),
    ("COMPARISONS", "comparison"), ("COMPARISON EXAM", "comparison"),
    ("WET READ", "wet read"), ("RECOMMENDATION(S)", "recommendations"), ("LUNGS", "lungs"),
])
def test_section_names(header, section):
  assert reports.section_name(header) == section


def test_sections_last_paragraph():
  s = reports.split_sections(
      "                                 FINAL REPORT\n PORTABLE CHEST OF ___\n \n"
      " COMPARISON:  ___ radiograph.\n \n Lines and tubes are unchanged.  Lungs are clear.\n"
      " \n No pneumothorax.\n")
  assert s.convention == "last_paragraph" and s.findings == ""
  assert s.impression == "Lines and tubes are unchanged. Lungs are clear. No pneumothorax."
  assert s.comparison == f"{D} radiograph."
  s = reports.split_sections("                                 FINAL REPORT\n \n"
                             " Heart size is normal.  No acute process.\n")
  assert (s.convention, s.impression) == ("last_paragraph",
                                          "Heart size is normal. No acute process.")


def test_sections_comparison_and_none_conventions():
  s = reports.split_sections(" FINAL REPORT\n INDICATION: cough\n \n"
                             " COMPARISON: ___. No change in mild cardiomegaly.\n")
  assert (s.convention, s.impression, s.comparison, s.indication) == (
      "comparison", f"{D} . No change in mild cardiomegaly.", "", "cough")
  s = reports.split_sections(" FINAL REPORT\n HISTORY: cough\n")
  assert (s.convention, s.findings, s.impression, s.indication) == ("none", "", "", "cough")


def test_sections_subheadings_repeats_and_addendum():
  s = reports.split_sections(
      " ADDENDUM: Discussed with Dr. ___ at 10:30.\n"
      " ______________________________________________________________________________\n"
      "                                 FINAL REPORT\n HISTORY: Chest pain.\n"
      " FINDINGS:\n \n PA AND LATERAL VIEWS OF THE CHEST: Normal mediastinum.\n"
      " LUNGS: Clear.\n HEART: Normal size.\n IMPRESSION:\n \n CONCLUSION: Normal chest.\n"
      " RECOMMENDATION(S): None.\n")
  assert s.findings == "Normal mediastinum. LUNGS: Clear. HEART: Normal size."
  assert s.impression == "Normal chest."
  assert s.indication == "Chest pain."   # no INDICATION: the HISTORY
  s = reports.split_sections(" FINDINGS: First try.\n IMPRESSION: Old.\n"
                             " FINDINGS: Second.\n IMPRESSION: New.\n")
  assert (s.findings, s.impression) == ("Second.", "New.")   # the last of each


def test_read_mimic_report():
  r = reports.read_mimic_report(STANDARD.encode(), "s1.txt", study="1", patient="10")
  assert (r.study, r.patient, r.convention, r.where) == ("1", "10", "headers", "s1.txt")
  with pytest.raises(reports.ReportFormatError, match=r"s1\.txt: byte offset"):
    reports.read_mimic_report(b"FINDINGS: \xff", "s1.txt", study="1", patient="10")


# ---------------------------------------------------------------------------------------------
# The real IU X-ray reports: Open-i XML against the CSV export


@pytest.fixture(scope="module")
def iu_shared():
  if not os.path.isdir(IU_DIR):
    pytest.skip(f"shared IU X-ray reports not found at {IU_DIR} (set MEDGUIDE_SHARED_DATA)")
  xml = reports.read_openi(os.path.join(IU_DIR, reports.OPENI_TGZ))
  csv = reports.read_iu_csv(os.path.join(IU_DIR, reports.IU_REPORTS_CSV),
                            os.path.join(IU_DIR, reports.IU_PROJECTIONS_CSV))
  return xml, csv


def test_shared_iu_counts(iu_shared):
  xml, csv = iu_shared
  assert len(xml) == 3955 and len(csv) == 3851
  both = lambda rs: sum(not r.lacking() for r in rs)
  assert both(csv) == 3331 and both(xml) == 3419         # SOURCE.txt: with_both=3331
  assert reports.lacking_counts(csv) == {"findings": 514, "impression": 31}
  assert reports.lacking_counts(xml) == {"findings": 530, "impression": 34}
  assert sum(not r.images for r in xml) == 104
  assert sum(len(r.images) for r in csv) == 7466


def test_shared_iu_xml_and_csv_agree(iu_shared):
  xml, csv = iu_shared
  diff = reports.compare_reports(xml, csv)
  assert diff["common"] == 3851 and diff["only_second"] == []
  assert len(diff["only_first"]) == 104
  assert all(not r.images for r in xml if r.study in set(diff["only_first"]))
  for section in ("findings", "impression", "comparison"):
    assert diff["differ"][section]["count"] == 0, section
  # The CSV's '#NAME?': a spreadsheet read '+PPD ...' and '-- XXXX' as formulas.
  assert diff["differ"]["indication"]["studies"] == ["1555", "3477", "3784"]
  by_csv = {r.study: r for r in csv}
  assert {by_csv[s].indication for s in ("1555", "3477", "3784")} == {"#NAME?"}
  # MeSH and problems agree; images agree through openi_filename, but for 4 the CSV lacks.
  lacking_images = {}
  for r in xml:
    if r.study in by_csv:
      c = by_csv[r.study]
      assert (r.mesh, r.problems) == (c.mesh, c.problems), r.study
      names = {reports.openi_filename(i, r.study) for i, _ in r.images}
      assert {n for n, _ in c.images} <= names, r.study
      if len(names) > len(c.images):
        lacking_images[r.study] = len(names) - len(c.images)
  assert lacking_images == {"2084": 2, "2560": 1, "3809": 1}
