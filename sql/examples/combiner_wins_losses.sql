-- The Combiner against each baseline, template by template at R@1: wins
-- (the Combiner hits, the baseline misses), losses, and both-hit/both-miss.
SELECT c.task, b.method AS baseline,
       sum(CASE WHEN c.target_rank = 1 AND b.target_rank > 1 THEN 1 ELSE 0 END) AS wins,
       sum(CASE WHEN c.target_rank > 1 AND b.target_rank = 1 THEN 1 ELSE 0 END) AS losses,
       sum(CASE WHEN c.target_rank = 1 AND b.target_rank = 1 THEN 1 ELSE 0 END) AS both_hit,
       sum(CASE WHEN c.target_rank > 1 AND b.target_rank > 1 THEN 1 ELSE 0 END) AS both_miss
FROM scores c
JOIN scores b ON b.task = c.task AND b.template_id = c.template_id AND b.method <> 'combiner'
WHERE c.method = 'combiner'
GROUP BY c.task, b.method
ORDER BY c.task, b.method
