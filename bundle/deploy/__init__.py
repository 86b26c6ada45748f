"""MONAI Deploy application for the MedSMILE bundle (optional: ``pip install -e ".[deploy]"``)."""
