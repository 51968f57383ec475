-- How many proposals samples needed, and how many ran out (table exhausted).
SELECT 'accepted' AS outcome, count(*) AS samples, avg(attempts) AS mean_attempts, max(attempts) AS max_attempts
FROM triplets
UNION ALL
SELECT 'exhausted', count(*), avg(attempts), max(attempts)
FROM exhausted;
