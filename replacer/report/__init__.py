"""What a finished run shows a person: `report.json` and `report.md` (`markdown`), and the figures (`figures`)."""
