-- The most common conditions (target relation + object) among mined triplets.
SELECT condition, count(*) AS triplets, count(DISTINCT subject) AS subjects
FROM triplets
GROUP BY condition
ORDER BY triplets DESC, condition
LIMIT 20;
