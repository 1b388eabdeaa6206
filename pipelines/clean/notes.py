"""Notes on a run's label counts: what a user should look at before trusting the labels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from pipelines.engine.qc_result import Label

# A screening collection is cervix photos with a few strays. A far larger no_cervix share says
# more about stage 0 at this site than about the collection: the bundled weights' first trial
# on real photos from other sites called 34% of their cervixes no_cervix (issue 13), and stage 0
# with a cervix source left out of its training found only 0.45-0.91 of that source's photos
# (weights/README.md, "How far stage 0 carries"). A quarter is a choice, not a measurement: no
# real archive's share of strays (the room, a covered lens) is known here; the synthetic
# collections draw 10-15% of scenes without a cervix, and a quarter leaves room above that.
# Below 20 photos one stray moves the share by 5 points. A quarter of the files unreadable is
# a folder of other things (documents, DICOM files, another program's exports) or a share
# failing: a job over 30,000 such files ended `done` without a word (an audit; `clean` exits 1
# only when not one file is readable). The same quarter and 20 hold for both notes.
NOTE_SHARE = 0.25
NOTE_MIN_FILES = 20


def _many(n: int, of: int) -> bool:
    return of >= NOTE_MIN_FILES and n >= NOTE_SHARE * of


def run_notes(by_label: Mapping[str, int]) -> list[str]:
    """What a user should look at before trusting a run's labels, from its counts by label
    (`clean` prints them, a job's status carries them). The labels stand either way."""
    return list(_notes(by_label).values())


def _notes(by_label: Mapping[str, int]) -> dict[str, str]:
    """`run_notes` by what they are about, so that `NoteWatch` says each one once."""
    notes = {}
    files = sum(by_label.values())
    bad = by_label.get(Label.UNREADABLE.value, 0)
    if _many(bad, files):
        notes["unreadable"] = (
            f"{bad} of {files} files ({bad / files:.0%}) could not be read as photos: the wrong folder (documents, "
            "DICOM files, another program's exports), damaged copies, or a share that dropped? Each file's reason is "
            "in the results' error column; those the OS could not read are tried again by the next run (a job's: "
            "Retry)")
    judged = files - bad
    n = by_label.get(Label.NO_CERVIX.value, 0)
    if _many(n, judged):
        notes["no_cervix"] = (
            f"{n} of {judged} readable photos ({n / judged:.0%}) were called no_cervix, far more than a screening "
            "collection holds: stage 0 may not know this site's photos (close-ups, another camera or light). Look at "
            "some of them before trusting the label; if they show cervixes, fit a presence head on the site's own "
            "labelled photos (README, \"Site adaptation\")")
    return notes


class NoteWatch:
    """A run's labels counted as its batches are stored, so that a note (`run_notes`) is said
    when it first holds, not at the end: a 10^6-photo `clean` runs for hours, and a site
    whose cervixes stage 0 misses learnt it only then. Each note is said once, with the counts
    so far (the run's end says it again over all rows, or not when the share fell back); a
    resume counts the rows done before it. `say` None counts nothing."""

    def __init__(self, say: Callable[[str], None] | None, labels: Iterable[str] = ()):
        self.say, self.counts, self.said = say, Counter(), set[str]()
        self.add(labels)

    def add(self, labels: Iterable[str]) -> None:
        if self.say is None:
            return
        self.counts.update(labels)
        for about, note in _notes(self.counts).items():
            if about not in self.said:
                self.said.add(about)
                self.say(note)
