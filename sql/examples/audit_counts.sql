-- Suspect templates per task and check (the score stage's audit table).
SELECT task, "check", count(*) AS templates
FROM audit
GROUP BY task, "check"
ORDER BY task, "check"
