# Citations of the method: the private spec ALGORITHM.md -> docs/method.md (same section numbers,
# §N -> §N; docs/method.md keeps the spec's top-level numbering and adds §N.M subsections).
# Usage: git grep -lz 'ALGORITHM\.md' -- ':!scripts/cite_method.sed' | xargs -0 sed -i -f scripts/cite_method.sed
s/the spec's table (ALGORITHM\.md §5)/the table of docs\/method.md §5.2/g
s/ALGORITHM\.md §\([0-9]\)/docs\/method.md §\1/g
s/ALGORITHM\.md/docs\/method.md/g
