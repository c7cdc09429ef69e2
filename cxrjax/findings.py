"""The 14 ChestX-ray14 findings, in the one order cxrjax uses everywhere.

The order is the CheXNet/NIH convention. Other files (label CSVs, prediction CSVs,
published tables) are mapped onto it by name, never by position.
"""

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_FINDINGS = len(FINDINGS)
NO_FINDING = "No Finding"

# Spellings seen in public files for the same finding (BBox_List_2017 says "Infiltrate").
ALIASES: dict[str, str] = {
    "Infiltrate": "Infiltration",
    "Pleural Thickening": "Pleural_Thickening",
    "Pleural_thickening": "Pleural_Thickening",
}


def canonical(name: str) -> str:
    """Map a finding name as spelled in some file onto cxrjax's spelling, or raise."""
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in FINDINGS:
        raise ValueError(f"unknown finding {name!r}; expected one of {', '.join(FINDINGS)}")
    return name
