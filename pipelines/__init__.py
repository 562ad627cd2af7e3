"""One module per arrow of the data flow; plain functions, usable without Prefect."""
