-- The hardest conditions: mean R@1 over every method scored, for
-- conditions with at least two templates, lowest first.
SELECT task, condition, max(n) AS templates, round(avg(recall_at_1), 3) AS mean_r1
FROM recall_by_condition
GROUP BY task, condition
HAVING max(n) >= 2
ORDER BY mean_r1, templates DESC, task, condition
LIMIT 20
