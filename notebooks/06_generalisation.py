# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: mystnb,tags,-all
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
# The paper's data mixes two populations: every COVID-19 image is an adult from the ieee8023 collection,
# nearly every other image a child from one hospital in Guangzhou. A model can score high inside such data
# and fail elsewhere (DeGrave et al. 2021; Roberts et al. 2021). The question here: on people from sources a
# model never trained on, can it still tell COVID-19 from other findings? First, whether any remedy gets there
# (lungs-only images, adults-only data, both, and lungs-only images with histogram equalisation), judged
# threshold-free: the ROC AUC of COVID-19 images against adults without COVID-19, both from populations no run
# trained or validated on, beside each arm's AUC on its own test images (an arm that did not learn the task
# is not judged). Specificity and sensitivity at an operating point follow as secondary. Then the paper's own
# runs at their operating points: **specificity ≥ 0.80 on adults without COVID-19** and **COVID-19 sensitivity
# ≥ 0.90**; how each number is made and every run's own numbers follow, folded away. Every sentence is computed
# from the run folders by `cxrlib.remedies` and `cxrlib.generalise`. Research code, not a diagnostic device.

# %% tags=["parameters"]
profile = "quick"
coronahack_dir = ""
extra_covid_dir = ""
run_root = ""  # empty: runs/<profile>/<data tag> in the repository (the run matrix's folder for this data)
# external_dirs: NAME=DIR, where the external sets of the runs are on this machine (empty means as recorded)
external_dirs = ""
remedy_root = ""  # where the remedy runs are (`make remedies`; any depth); empty: run_root

# %% tags=["hide-input", "nbval-ignore-output"]
from pathlib import Path

from IPython.display import Markdown, display

from cxrlib import book, data, generalise, plots, remedies, results
from cxrlib.audit import MIN_SUBGROUP
from cxrlib.config import external_sets

run_root = run_root or book.default_run_root(profile, coronahack_dir, extra_covid_dir)
display(book.banner(book.banner_from_record(run_root)))  # the runs' data, adult negatives included, as recorded
tables = book.Tables(6)
arms = generalise.load_arms(run_root)
cohort, _ = data.load_table(coronahack_dir, extra_covid_dir)  # this chapter's data: ages, and the sources to hold out
ages, age_notes = generalise.read_ages(arms, external_sets(external_dirs), cohorts=[cohort])
table = generalise.measures(arms, ages)
summary = generalise.summary(table)
remedy_arms = remedies.load_arms(remedy_root or run_root)
remedy_ages, _ = generalise.read_ages(remedy_arms, external_sets(external_dirs), cohorts=[cohort])
all_ages = ages.combine_first(remedy_ages)  # saved beside generalisation.json: `cxrlib verify` uses the same
remedy_aucs = remedies.auc_rows(remedy_arms, all_ages)  # threshold-free, first
remedy_goals = remedies.goal_rows(remedy_arms, all_ages)  # at each run's operating point, secondary
remedy_argmax = remedies.goal_rows(remedy_arms, all_ages, argmax=True)  # the same runs at argmax, beside it
summary_file = generalise.save_summary(  # the book's first page states it; `cxrlib verify` recomputes it
    table, Path(run_root) / "generalisation.json",
    remedies.record(remedy_arms, remedy_goals, remedy_aucs) if len(remedy_arms) else None,
    Path(remedy_root).name if remedy_root else "", all_ages)

# %% [markdown]
# ## Can any remedy make it generalise?
#
# Each remedy arm trains without the populations it is judged on: the ieee8023 adults without COVID-19 (same
# collection and web-figure processing as the COVID-19 images, another diagnosis: no source shortcut helps),
# one country's COVID-19 images, and, for the arms that do not train on NIH images, the NIH adults. *Lungs
# only* paints everything outside the estimated lung fields grey (the mirror of chapter 4's lungs-removed
# experiment); *adults only* drops the paediatric images and takes the NIH adults as the non-COVID class;
# the last arm adds CLAHE to lungs only in adults (lung segmentation plus histogram equalisation, as
# {cite:t}`teixeira2021segmentation` propose against source bias).
#
# Each arm is judged first without any threshold: how well it ranks the held-out COVID-19 images above the
# held-out adults without COVID-19 (ROC AUC; 0.5 is chance), the mean over its runs with a 95% interval from
# resampling patients. Beside it, its ROC AUC on its own test images (the sources it trained on, held-out
# images excluded): an arm below the floor there learned the task only weakly, and its numbers on unseen people
# are shown apart and not judged.

# %% tags=["hide-input", "nbval-ignore-output"]
if remedy_arms.empty:
    display(Markdown(f"No remedy runs under `{Path(remedy_root or run_root).name}`: run `make remedies` with "
                     "real data (CORONAHACK_DIR, EXTRA_COVID_DIR, EXTRA_NEGATIVES_DIR), then this chapter."))
else:
    display(book.banner("**What ran.** " + remedies.settings(remedy_arms) + "."))
    display(Markdown(remedies.source_and_label(cohort, remedy_arms["config"].iloc[0]["hold_out"])))
    display(book.banner(remedies.auc_paragraph(remedy_aucs), kind="important"))  # the threshold-free result first
    display(Markdown(remedies.auc_rule()))
    display(tables(remedies.auc_table(remedy_aucs),
           "Each remedy arm, threshold-free: ROC AUC of the held-out COVID-19 images against the held-out adults "
           "without COVID-19 (mean over the arm's runs, 95% patient-bootstrap interval; each run's own beside it), "
           "the ROC AUC on its own test images (held-out images excluded), the verdict that follows, and the "
           "threshold each run uses at its operating point (flagged where the lower bound decided it)."))

# %% mystnb={"figure": {"caption": "Each remedy arm threshold-free: top, ROC AUC of the held-out COVID-19 images against the held-out adults without COVID-19, populations no run trained or validated on (dot: the mean over the arm's runs; bar: 95% patient-bootstrap interval; dashed line: the goal); bottom, ROC AUC on its own test images (dashed line: the floor below which an arm learned the task only weakly). Colour: the verdict.", "name": "fig-remedies-auc"}} tags=["hide-input", "nbval-ignore-output"]
if len(remedy_aucs):
    plots.forest(remedies.auc_forest_rows(remedy_aucs), {"unseen_auc": remedies.AUC_GOAL,
                 "own_auc": remedies.LEARNED_FLOOR}, label=("arm_runs",), metric_names=remedies.AUC_WORDS);

# %% [markdown]
# ### At an operating point (secondary)
#
# The same arms with COVID-19 called when its probability reaches each run's validation threshold for 95%
# sensitivity, and, beside it, at argmax: an operating point can turn one ranking into very different
# specificities and sensitivities, so these numbers follow the threshold-free ones and do not replace them.

# %% tags=["hide-input", "nbval-ignore-output"]
if len(remedy_arms):
    display(Markdown(remedies.threshold_rule(remedy_arms)))
    display(tables(remedies.operating_table(remedy_goals, remedy_argmax),
           "Each remedy arm on the populations it never trained or validated on, at each run's validation "
           "threshold (with the verdict against the operating-point goal) and at argmax: pooled over the arm's "
           "runs, 95% intervals."))

# %% mystnb={"figure": {"caption": "Each remedy arm on the populations it never trained or validated on, at each run's validation operating point (secondary to the threshold-free figure above): specificity on adults without COVID-19 and COVID-19 sensitivity on the held-out country (dot), with its 95% interval (bar), pooled over the arm's runs (their number and seeds in brackets); dashed lines: the goals. Colour: the verdict; hollow: too few images to say.", "name": "fig-remedies-forest"}} tags=["hide-input", "nbval-ignore-output"]
if len(remedy_goals):
    plots.forest(remedy_goals, generalise.GOAL, label=("arm_runs", "population"));

# %% tags=["hide-input", "nbval-ignore-output"]
for paragraph in remedies.paragraphs(remedy_arms, remedy_goals, remedy_aucs):
    display(Markdown(paragraph))

# %% [markdown]
# ## The paper's runs on people they never saw

# %% tags=["hide-input", "nbval-ignore-output"]
display(book.banner(generalise.goal_verdict(table), kind="important"))  # the verdict first
if generalise.bound_note(arms):  # runs whose operating threshold the lower bound decided
    display(Markdown(generalise.bound_note(arms)))

# %% tags=["hide-input", "nbval-ignore-output"]
tables(generalise.summary_for_reading(summary),
       "The goal, arm by arm, on sources the runs never trained on: each measure pooled over the arm's runs, its "
       "95% interval, the verdict it gives, how many runs and seeds stand behind it and what each run gives on "
       "its own. Children and images of unknown age are reported apart and are held to no goal.",
       empty="No complete run was measured on a source it never trained on: nothing to judge yet.")

# %% mystnb={"figure": {"caption": "The measures of the table above: each arm's estimate on each population (dot) with its 95% interval (bar), pooled over the arm's runs (their number and seeds in brackets); the dashed lines are the goals (specificity 0.80 on adults without COVID-19, COVID-19 sensitivity 0.90). Colour: the verdict; hollow: too few images to say.", "name": "fig-generalisation-forest"}} tags=["hide-input", "nbval-ignore-output"]
if len(summary):
    plots.forest(summary, generalise.GOAL, label=("arm_runs", "population"));

# %% [markdown]
# ## How the numbers are made
#
# - **Arms.** The *paper set-up* (CoronaHack + ieee8023); *adult negatives* (NIH adults added to training as
#   non-COVID); a *held-out source* (all patients of one ieee8023 country or web site moved to test only);
#   a *remedy* (CLAHE or a crop to the lung fields, in training and evaluation alike). Runs that differ only in
#   task, loss, initialisation or seed are one arm; what else departs from the paper's data is part of the
#   arm's name.
# - **Populations.** Adults are people aged 18 or more by their collection's metadata; NIH images of younger
#   patients are *children*, and images without an age are *age unknown*, each reported apart and never
#   counted as adults. An NIH image is no evidence for a run that trained on NIH images ("this scanner →
#   not COVID-19" is a shortcut of its own); the ieee8023 images without COVID-19 in a run's test split come
#   from the same collection as its COVID-19 images, so no source shortcut helps there.
# - **Operating point.** COVID-19 is called when its probability reaches the threshold each run chose on
#   validation for 95% sensitivity, raised to a lower bound where it fell below it (the bound, and the remedy
#   runs it decided, are in the remedies' first table).
# - **Intervals.** 95%, at each end the wider of the Wilson interval on images and a patient-bootstrap
#   percentile interval (a patient's images resampled together). An arm's estimate pools its runs' calls;
#   its interval covers which patients were sampled, not which seed trained the model: the count of runs and
#   seeds, and each run's own verdict, say how much stands behind it. Fewer than 10 images: "too few to say".
# - **Verdict.** *Met* when the interval's lower end reaches the goal, *not met* when its upper end is below
#   it, else *undecided*; an arm's pooled verdict is *undecided* when its own runs contradict each other. An arm
#   meets the goal when it has both measures and both are met, and misses it when either is not met.

# %% tags=["hide-input", "nbval-ignore-output"]
if age_notes:  # a source whose ages could not be read: its images are "age unknown", never adults
    display(Markdown("**Ages not read.** " + " ".join(age_notes)))

# %% [markdown]
# ## Details
#
# Each fold opens with a click: every run's own numbers, the cross-population test by age, sex and view, and
# the sources large enough to hold out. Last, what was measured, in counts.

# %% tags=["hide-input", "nbval-ignore-output"]
runs = table[table["level"] == "run"]
shown, same = results.narrow(generalise.summary_for_reading(runs))
display(book.folded(f"Every measurement, run by run ({len(runs)} rows, own test split included)",
               tables(shown, "Every run on every population it was measured on, at its own operating point. Evidence "
                      "\"no\": the run trained on images of that source (or it is its own test split), so a "
                      f"source shortcut can pass the test. {same}", empty="No complete run: nothing was measured.")))

# %% tags=["hide-input", "nbval-ignore-output"]
paper = arms[arms["arm"] == "paper set-up"]
external = sorted({name for run_dir in paper["run_dir"] for name in generalise.external_names(run_dir)})
here = external_sets(external_dirs)
if paper.empty or not external:
    display(Markdown("The cross-population test by age, sex and view: no paper set-up run has an external set."))
for name in external:
    first = paper[[name in generalise.external_names(d) for d in paper["run_dir"]]].iloc[0]
    display(book.folded(f"{generalise.EXTERNAL_WORDS.get(name, name)} by age band, sex and view ({first['run_name']})",
                   *(tables(generalise.external_subgroups(first["run_dir"], name, by, where=here.get(name, "")),
                            f"{generalise.EXTERNAL_WORDS.get(name, name)} by {by.replace('_', ' ')}, paper set-up "
                            f"run \"{first['run_name']}\": Wilson 95% intervals on images.")
                     for by in ("age_band", "sex", "view"))))

# %% tags=["hide-input", "nbval-ignore-output"]
sizes = data.source_sizes(cohort, min_images=MIN_SUBGROUP)
display(book.folded(f"Which sources can be held out? ({int(sizes['enough'].sum())} of {len(sizes)} have at least "
               f"{MIN_SUBGROUP} COVID-19 images)",
               tables(sizes[sizes["enough"]].drop(columns="enough"),
                      f"COVID-19 images per ieee8023 country and web site, those with at least {MIN_SUBGROUP}: "
                      "each can be held out with --hold-out column=value (the hold_out parameter).",
                      empty="No source has enough COVID-19 images to be held out.")))

# %% tags=["nbval-check-output", "remove-cell"]
# Which arms were measured on which populations, with how many images: the same on every machine (estimates
# and verdicts rest on the last decimals of the CPU's kernels, so they are not checked).
print(generalise.population_counts(table))
