# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -papermill,-execution
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -papermill,-widgets
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Does it generalise?
#
# The paper's data mixes two populations: every COVID-19 image is an adult from the ieee8023
# collection, nearly every other image a child from one hospital in Guangzhou. A model can score high
# inside such data and fail elsewhere (DeGrave et al. 2021; Roberts et al. 2021). This chapter reads the
# run folders of four arms and measures each on people it never trained on:
#
# - **paper set-up**: CoronaHack + ieee8023, scored on adults without COVID-19 from another hospital
#   (NIH ChestX-ray14: "No Finding" and pneumonia), the **cross-population test**;
# - **adult negatives**: the same with NIH adults added to training as non-COVID. Its specificity on NIH
#   images is *no evidence*: "NIH scanner → non-COVID" is a shortcut of its own. It is judged on adult
#   sources it did not train on (the ieee8023 adults without COVID-19, held-out sources);
# - **held-out source**: all patients of one ieee8023 source (country or web site) moved to test only:
#   COVID-19 sensitivity on a source the model never saw;
# - **remedy**: an image-level remedy (`preprocess`: CLAHE or a crop to the lung fields) applied in
#   training and evaluation alike.
#
# Every sentence below is computed from the numbers by `cxrlib.generalise`; an arm without a run
# says "not run". Research code, not a diagnostic device.

# %% tags=["parameters"]
profile = "quick"
coronahack_dir = ""
extra_covid_dir = ""
run_root = ""  # empty: runs/<profile>/<data tag> in the repository (the run matrix's folder for this data)
# external_dirs: NAME=DIR, where the external sets of the runs are on this machine (empty means as recorded)
external_dirs = ""

# %% tags=["hide-input"]
from IPython.display import Markdown, display

from cxrlib import book, data, generalise, results
from cxrlib.audit import MIN_SUBGROUP
from cxrlib.config import banner_from_record, external_sets
from cxrlib.runs import default_run_root

run_root = run_root or default_run_root(profile, coronahack_dir, extra_covid_dir)
display(book.banner(banner_from_record(run_root)))  # the runs' data, adult negatives included, as recorded
arms = generalise.load_arms(run_root)
table = generalise.measures(arms)
display(Markdown(f"{len(arms)} complete run(s) in the run matrix's folder: " + (", ".join(
    f"{arm} ({n})" for arm, n in arms["arm"].value_counts().items()) if len(arms) else "none yet.")))

# %% [markdown]
# ## Every measurement
#
# Every number is at the run's operating point: COVID-19 called when its probability reaches the
# threshold chosen on validation for 95% sensitivity. Intervals: patient bootstrap (own test split,
# external sets) or Wilson on images (subsets of the test split); fewer than the minimum number of
# images is "too few to say". `evidence` is False where the run trained on images of the same source.

# %%
shown = table.assign(result=table.apply(generalise.fmt, axis=1)) if len(table) else table.assign(result=[])
for arm, rows in shown.groupby("arm", sort=False):  # one table per arm: narrow enough for the page
    rows, same = results.narrow(rows[["run", "population", "metric", "result", "ci_unit", "evidence", "note"]])
    display(Markdown(f"**{arm}.** {same}"), rows.reset_index(drop=True))
if shown.empty:
    display(Markdown("No complete run: nothing was measured."))

# %% tags=["nbval-check-output"]
print("arms measured:", ", ".join(sorted(set(table["arm"]))) if len(table) else "none")

# %% [markdown]
# ## What the numbers say

# %%
display(Markdown("\n".join(generalise.verdicts(table))
                 + f"\n\n(\"too few to say\": fewer than {MIN_SUBGROUP} images in the denominator.)"))
display(Markdown(generalise.goal_verdict(table)))

# %% [markdown]
# ## The arms side by side on adults without COVID-19
#
# Specificity on the ieee8023 adults without COVID-19 in each run's test split, the one adult population
# that no arm can pass by recognising a scanner.

# %%
population = "ieee8023 adults without COVID-19 (test split)"
if (table["arm"] == "paper set-up").any():
    display(generalise.arm_comparison(table, population))
else:
    display(Markdown("The paper set-up was not run: nothing to compare with."))

# %% [markdown]
# ## The cross-population test by age, sex and view
#
# The paper set-up's scores on each external set, by subgroup (Wilson intervals on images).

# %%
paper = arms[arms["arm"] == "paper set-up"]
external = sorted(table.loc[(table["arm"] == "paper set-up") & table["population"].str.startswith("external: "),
                            "population"].str.removeprefix("external: ").unique())
if paper.empty or not external:
    display(Markdown("No paper set-up run with an external set: not run."))
here = external_sets(external_dirs)
for name in external:
    for by in ("age_band", "sex", "view"):
        display(Markdown(f"**{name}** by {by}"),
                generalise.external_subgroups(paper["run_dir"].iloc[0], name, by, where=here.get(name, "")))

# %% [markdown]
# ## Which sources can be held out?
#
# COVID-19 images per ieee8023 country and web site. A source with enough images can be held out with
# `--hold-out <column>=<value>` (the `hold_out` parameter).

# %%
cohort, _ = data.load_table(coronahack_dir, extra_covid_dir)
sizes = data.source_sizes(cohort, min_images=MIN_SUBGROUP)
display(Markdown(f"{int(sizes['enough'].sum())} of {len(sizes)} sources have at least {MIN_SUBGROUP} COVID-19 images:"))
sizes[sizes["enough"]]
