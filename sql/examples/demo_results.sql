-- Recall (%) per task and method, each method's margin over the best
-- baseline at R@1 (the Combiner's is what the method adds), chance 1/15.
WITH r AS (
  SELECT task, method, 100 * recall_at_1 AS r1, 100 * recall_at_2 AS r2, 100 * recall_at_3 AS r3
  FROM results
),
best AS (
  SELECT task, max(r1) AS best_baseline_r1 FROM r WHERE method <> 'combiner' GROUP BY task
)
SELECT r.task, r.method, round(r.r1, 1) AS r_at_1, round(r.r2, 1) AS r_at_2, round(r.r3, 1) AS r_at_3,
       round(r.r1 - b.best_baseline_r1, 1) AS r1_minus_best_baseline, round(100.0 / 15, 1) AS chance_r1
FROM r JOIN best b USING (task)
ORDER BY CASE WHEN r.task = 'average' THEN 1 ELSE 0 END, r.task, r.method
