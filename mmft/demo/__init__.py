"""The offline demo: its datasets (openclipart clip art, textile inspection), its stage configs (shipped
as package data in `configs/`) and the runner behind `mmft demo`."""
