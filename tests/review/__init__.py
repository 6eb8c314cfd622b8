"""The clinician review page (issue 34): verified SRs, accounts, the page in a browser against serve."""
