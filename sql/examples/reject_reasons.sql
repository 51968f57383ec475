-- Why lines were rejected at ingest, most common first.
SELECT split_part(reason, ':', 1) AS reason, count(*) AS lines, min(line_number) AS first_line
FROM rejects
GROUP BY 1
ORDER BY lines DESC;
